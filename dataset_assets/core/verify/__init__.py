"""Checking what is on disk: files and sizes against the manifest and the state, DICOM
headers (read as files land, or by the check), and stray files.
"""
