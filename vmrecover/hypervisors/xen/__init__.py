"""Citrix XenServer and XCP-ng pools, through the XenAPI SDK (PyPI ``XenAPI``): ``session.py`` logs in
to the pool master.  Backup, restore and instant recovery follow (issue 12)."""
