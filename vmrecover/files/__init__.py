"""Single-file restore: libguestfs over a restore point's disks (guest.py), copy-out (copyout.py) and the
service that keeps appliances open between commands (service.py)."""
