// The vCenter simulator (vcsim, from Debian's golang-github-vmware-govmomi-dev) as the tests run it.
//
// Built by tests/vsphere.py (GO111MODULE=off against /usr/share/gocode) into build/vcsim/vcsim.
// It serves a VPX model over plain HTTP on -listen: one datacenter DC0 with a cluster DC0_C0 of
// -cluster-hosts hosts and -standalone-hosts standalone hosts, no VMs, and -datastores local datastores
// LocalDS_0.. whose folders are -dir/LocalDS_<i> (not temp dirs, so a test knows where the bytes are),
// mounted on every host.  Logins need exactly -user / -password.
//
// Once serving it prints one JSON line on stdout: {"url": ..., "datastores": {name: folder}}.
//
// Test-only endpoint (the HTTPS proxy in tests/vsphere.py uses it; clients never see it):
//
//	POST /_harness/forget-datastore?ref=<moref value>   drops a datastore from the inventory
//	(hosts, their datastore systems and browsers, compute resources, the datacenter, its folder,
//	VMs) the way ESXi's RemoveDatastore makes it disappear, which vcsim 0.24 cannot do itself.
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

func forgetDatastore(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	ref := types.ManagedObjectReference{Type: "Datastore", Value: r.URL.Query().Get("ref")}
	ds, ok := simulator.Map.Get(ref).(*simulator.Datastore)
	if !ok {
		http.Error(w, "no such datastore", http.StatusNotFound)
		return
	}

	// Entities whose property lists name datastores: update through the registry so that property
	// collectors and container views see the change.
	fields := map[string]string{
		"HostSystem": "Datastore", "ComputeResource": "Datastore", "ClusterComputeResource": "Datastore",
		"Datacenter": "Datastore", "VirtualMachine": "Datastore", "Folder": "ChildEntity",
		"StoragePod": "ChildEntity",
	}
	props := map[string]string{"Datastore": "datastore", "ChildEntity": "childEntity"}
	for kind, field := range fields {
		for _, e := range simulator.Map.All(kind) {
			simulator.Map.WithLock(e, func() {
				if kept, found := withoutRef(e, field, ref); found {
					simulator.Map.Update(e, []types.PropertyChange{{Name: props[field], Val: kept}})
					setRefs(e, field, kept)
				}
			})
			if h, isHost := e.(*simulator.HostSystem); isHost && h.ConfigManager.DatastoreSystem != nil {
				if dss := simulator.Map.Get(*h.ConfigManager.DatastoreSystem); dss != nil {
					simulator.Map.WithLock(dss, func() {
						if kept, found := withoutRef(dss, "Datastore", ref); found {
							setRefs(dss, "Datastore", kept)
						}
					})
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
