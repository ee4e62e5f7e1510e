"""Adapters to QEMU: starting it (``launch``), attaching over QMP and following the VM's life."""
