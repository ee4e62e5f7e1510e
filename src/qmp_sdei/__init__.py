"""qmp-sdei: an SDEI dispatcher and PSCI-version guard that runs beside a QEMU aarch64 VM.

The package is layered (see ``docs/architecture.md``): ``abi`` holds constants, ``sdei`` the pure
dispatcher, ``versions`` and ``config`` the pure policy, and ``qemu``/``conduit`` the asyncio adapters.
"""

__version__ = "0.1.0"
