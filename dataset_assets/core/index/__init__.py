"""The IDC tables: the index shipped by idc-index-data (where it is, its release, its
snapshot and per-release facts), the indices fetched on demand, user SQL over them, citations
and viewer links.
"""
