"""The artifact contract: what every artifact and every runtime shim share, at the bottom of the package.

The I/O signature data (`signature`), the manifest schema and reader (`manifest`), the errors (`errors`), the
`Session` protocol, `SessionBase` and the default thread count (`session`). Torch-free; it imports no other part
of lfm_export (the import contracts in pyproject.toml hold that in `make lint`), and the core, the backends and
the shims import it.
"""
