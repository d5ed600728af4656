// The vCenter simulator (vcsim, from Debian's golang-github-vmware-govmomi-dev) as the tests run it.
//
// Built by tests/vsphere/build.py (GO111MODULE=off against /usr/share/gocode) into build/vcsim/vcsim.
// It serves a VPX model over plain HTTP on -listen: one datacenter DC0 with a cluster DC0_C0 of
// -cluster-hosts hosts and -standalone-hosts standalone hosts, no VMs, and -datastores local datastores
// LocalDS_0.. whose folders are -dir/LocalDS_<i> (not temp dirs, so a test knows where the bytes are),
// mounted on every host.  Logins need exactly -user / -password.
//
// Once serving it prints one JSON line on stdout: {"url": ..., "datastores": {name: folder}}.
//
// Test-only endpoints (the HTTPS proxy in tests/vsphere/proxy.py uses them; clients never see them),
// for what vcsim 0.24 cannot do itself:
//
//	POST /_harness/mount-datastore?ref=<datastore>&dss=<HostDatastoreSystem>
//	    the host of dss mounts the datastore (its "host" list, the host's and its compute
//	    resource's "datastore"): vcsim's CreateNasDatastore records no host mount.
//	POST /_harness/forget-datastore?ref=<datastore>[&dss=<HostDatastoreSystem>]
//	    unmounts it from that host; once no host mounts it (or without dss) drops it from the
//	    whole inventory (hosts, their datastore systems and browsers, compute resources, the
//	    datacenter, its folder, VMs), the way ESXi's RemoveDatastore makes it disappear.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"reflect"
	"syscall"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on")
	dir := flag.String("dir", "", "folder holding the local datastores' folders (required)")
	user := flag.String("user", "", "the only user name accepted (required)")
	password := flag.String("password", "", "its password (required)")
	clusterHosts := flag.Int("cluster-hosts", 2, "hosts in cluster DC0_C0")
	standalone := flag.Int("standalone-hosts", 1, "standalone hosts in DC0")
	datastores := flag.Int("datastores", 2, "local datastores LocalDS_<i>, on every host")
	flag.Parse()
	if *dir == "" || *user == "" || *password == "" {
		log.Fatal("-dir, -user and -password are required")
	}

	model := simulator.VPX()
	model.Autostart = false
	model.Datacenter = 1
	model.Cluster = 1
	model.ClusterHost = *clusterHosts
	model.Host = *standalone
	model.Datastore = 0 // created below in known folders
	model.Machine = 0
	model.Portgroup = 1
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}

	folders := map[string]string{}
	client, err := vim25.NewClient(context.Background(), model.Service) // in-process, no HTTP
	if err != nil {
		log.Fatal(err)
	}
	if err := createDatastores(client, *dir, *datastores, folders); err != nil {
		log.Fatal(err)
	}

	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *password)}
	model.Service.ServeMux = http.NewServeMux()
	model.Service.ServeMux.HandleFunc("/_harness/forget-datastore", forgetDatastore)
	model.Service.ServeMux.HandleFunc("/_harness/mount-datastore", mountDatastore)
	server := model.Service.NewServer()

	u := *server.URL
	u.User = nil
	line, _ := json.Marshal(map[string]interface{}{"url": u.String(), "datastores": folders})
	fmt.Println(string(line))

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	server.Close()
}

// createDatastores makes LocalDS_<i> in dir/LocalDS_<i> and mounts it on every host.
func createDatastores(client *vim25.Client, dir string, n int, folders map[string]string) error {
	ctx := context.Background()
	hosts := simulator.Map.All("HostSystem")
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("LocalDS_%d", i)
		path, err := filepath.Abs(filepath.Join(dir, name))
		if err != nil {
			return err
		}
		if err := os.MkdirAll(path, 0o755); err != nil {
			return err
		}
		folders[name] = path
		for _, h := range hosts {
			host := object.NewHostSystem(client, h.Reference())
			dss, err := host.ConfigManager().DatastoreSystem(ctx)
			if err != nil {
				return err
			}
			if _, err := dss.CreateLocalDatastore(ctx, name, path); err != nil {
				return fmt.Errorf("datastore %s on %s: %w", name, host.Reference().Value, err)
			}
		}
	}
	return nil
}

// withoutRef returns the []ManagedObjectReference field *name* of obj (if it has one) minus ref, and
// whether ref was there.
func withoutRef(obj mo.Reference, name string, ref types.ManagedObjectReference) ([]types.ManagedObjectReference, bool) {
	v := reflect.ValueOf(obj)
	for v.Kind() == reflect.Ptr {
		v = v.Elem()
	}
	if v.Kind() != reflect.Struct {
		return nil, false
	}
	f := v.FieldByName(name)
	if !f.IsValid() {
		return nil, false
	}
	refs, ok := f.Interface().([]types.ManagedObjectReference)
	if !ok {
		return nil, false
	}
	kept := make([]types.ManagedObjectReference, 0, len(refs))
	found := false
	for _, r := range refs {
		if r == ref {
			found = true
		} else {
			kept = append(kept, r)
		}
	}
	return kept, found
}

// setRefs replaces the field *name* of obj with refs (a fresh slice: vcsim lets a host and its
// datastore system share one backing array).
func setRefs(obj mo.Reference, name string, refs []types.ManagedObjectReference) {
	v := reflect.ValueOf(obj).Elem()
	v.FieldByName(name).Set(reflect.ValueOf(refs))
}

// hostOf returns the host whose HostDatastoreSystem is dss, and that system.
func hostOf(dss string) (*simulator.HostSystem, mo.Reference) {
	for _, e := range simulator.Map.All("HostSystem") {
		h := e.(*simulator.HostSystem)
		if ref := h.ConfigManager.DatastoreSystem; ref != nil && ref.Value == dss {
			return h, simulator.Map.Get(*ref)
		}
	}
	return nil, nil
}

// editRefs applies f to the []ManagedObjectReference field *field* (property *prop*) of obj, through
// the registry when prop is set, so that property collectors and container views see the change.
func editRefs(obj mo.Reference, field, prop string, f func([]types.ManagedObjectReference) []types.ManagedObjectReference) {
	simulator.Map.WithLock(obj, func() {
		v := reflect.ValueOf(obj).Elem().FieldByName(field)
		if !v.IsValid() {
			return
		}
		refs := f(append([]types.ManagedObjectReference(nil), v.Interface().([]types.ManagedObjectReference)...))
		if prop != "" {
			simulator.Map.Update(obj, []types.PropertyChange{{Name: prop, Val: refs}})
		}
		setRefs(obj, field, refs)
	})
}

func adding(ref types.ManagedObjectReference) func([]types.ManagedObjectReference) []types.ManagedObjectReference {
	return func(refs []types.ManagedObjectReference) []types.ManagedObjectReference {
		for _, r := range refs {
			if r == ref {
				return refs
			}
		}
		return append(refs, ref)
	}
}

func removing(ref types.ManagedObjectReference) func([]types.ManagedObjectReference) []types.ManagedObjectReference {
	return func(refs []types.ManagedObjectReference) []types.ManagedObjectReference {
		kept := refs[:0]
		for _, r := range refs {
			if r != ref {
				kept = append(kept, r)
			}
		}
		return kept
	}
}

func harnessArgs(w http.ResponseWriter, r *http.Request) (*simulator.Datastore, *simulator.HostSystem, mo.Reference, bool) {
	if r.Method != http.MethodPost {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return nil, nil, nil, false
	}
	ref := types.ManagedObjectReference{Type: "Datastore", Value: r.URL.Query().Get("ref")}
	ds, ok := simulator.Map.Get(ref).(*simulator.Datastore)
	if !ok {
		http.Error(w, "no such datastore", http.StatusNotFound)
		return nil, nil, nil, false
	}
	var host *simulator.HostSystem
	var dss mo.Reference
	if name := r.URL.Query().Get("dss"); name != "" {
		if host, dss = hostOf(name); host == nil {
			http.Error(w, "no such datastore system", http.StatusNotFound)
			return nil, nil, nil, false
		}
	}
	return ds, host, dss, true
}

// mountDatastore records that the host of HostDatastoreSystem dss mounts datastore ref (vcsim's
// CreateNasDatastore lists no host in the datastore's "host", and cannot add a second host).
func mountDatastore(w http.ResponseWriter, r *http.Request) {
	ds, host, dss, ok := harnessArgs(w, r)
	if !ok || host == nil {
		if ok {
			http.Error(w, "dss is required", http.StatusBadRequest)
		}
		return
	}
	editRefs(host, "Datastore", "datastore", adding(ds.Self))
	editRefs(dss, "Datastore", "", adding(ds.Self))
	if parent := simulator.Map.Get(*host.Parent); parent != nil {
		editRefs(parent, "Datastore", "datastore", adding(ds.Self))
	}
	simulator.Map.WithLock(ds, func() {
		for _, m := range ds.Host {
			if m.Key == host.Self {
				return
			}
		}
		mounts := append(append([]types.DatastoreHostMount(nil), ds.Host...), types.DatastoreHostMount{
			Key: host.Self,
			MountInfo: types.HostMountInfo{
				Path:       ds.Info.GetDatastoreInfo().Url,
				AccessMode: string(types.HostMountModeReadWrite),
				Mounted:    types.NewBool(true),
				Accessible: types.NewBool(true),
			},
		})
		simulator.Map.Update(ds, []types.PropertyChange{{Name: "host", Val: mounts}})
		ds.Host = mounts
	})
	w.WriteHeader(http.StatusNoContent)
}

// forgetDatastore unmounts datastore ref from the host of HostDatastoreSystem dss (if given), and when
// no host mounts it any more drops it from the whole inventory, as ESXi's RemoveDatastore does.
func forgetDatastore(w http.ResponseWriter, r *http.Request) {
	ds, host, dss, ok := harnessArgs(w, r)
	if !ok {
		return
	}
	ref := ds.Self
	if host != nil {
		editRefs(host, "Datastore", "datastore", removing(ref))
		editRefs(dss, "Datastore", "", removing(ref))
		left := false
		simulator.Map.WithLock(ds, func() {
			var mounts []types.DatastoreHostMount
			for _, m := range ds.Host {
				if m.Key != host.Self {
					mounts = append(mounts, m)
				}
			}
			simulator.Map.Update(ds, []types.PropertyChange{{Name: "host", Val: mounts}})
			ds.Host = mounts
			left = len(mounts) > 0
		})
		if left {
			w.WriteHeader(http.StatusNoContent)
			return
		}
	}

	fields := map[string]string{
		"HostSystem": "Datastore", "ComputeResource": "Datastore", "ClusterComputeResource": "Datastore",
		"Datacenter": "Datastore", "VirtualMachine": "Datastore", "Folder": "ChildEntity",
		"StoragePod": "ChildEntity",
	}
	props := map[string]string{"Datastore": "datastore", "ChildEntity": "childEntity"}
	for kind, field := range fields {
		for _, e := range simulator.Map.All(kind) {
			if _, found := withoutRef(e, field, ref); found {
				editRefs(e, field, props[field], removing(ref))
			}
			if h, isHost := e.(*simulator.HostSystem); isHost && h.ConfigManager.DatastoreSystem != nil {
				if s := simulator.Map.Get(*h.ConfigManager.DatastoreSystem); s != nil {
					editRefs(s, "Datastore", "", removing(ref))
				}
			}
		}
	}
	if ds.Browser.Value != "" {
		simulator.Map.Remove(ds.Browser)
	}
	simulator.Map.Remove(ref)
	w.WriteHeader(http.StatusNoContent)
}
