"""The FUSE datastore: the only place pyfuse3 is imported."""
