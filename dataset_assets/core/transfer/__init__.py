"""Moving bytes: s5cmd (binary, flags, the one batch runner, process lifecycle), progress
parsing, the download root's control folder, the download state (snapshot and journal), the
series engine and the instance engine.
"""
