"""The IDC catalog: the index in DuckDB, the table of collections, on-demand indices, and the
index's checks.
"""
