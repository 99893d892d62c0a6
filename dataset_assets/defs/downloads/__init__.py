"""Collections downloaded: manifests, the downloads (whole, or in shards), their checks and jobs."""
