"""HTTP bundles: single-file datasets behind HTTP(S) URLs."""
