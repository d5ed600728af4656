"""Recovery sessions: boot a VM from its backup, migrate it, discard the overlay."""
