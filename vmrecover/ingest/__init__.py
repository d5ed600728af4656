"""Backup ingest: disk sources (local images now; vSphere and XenServer later) and the pipeline."""
