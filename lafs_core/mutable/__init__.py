"""Mutable files: SDMF and MDMF keys, share layouts, publishing and retrieving, as pure steps."""
