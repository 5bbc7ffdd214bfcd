"""The `tlfeat` command line: thin click adapters over the `tlfeat` library."""
