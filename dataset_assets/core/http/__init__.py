"""Single-file datasets behind HTTP(S): resumable, verified downloads with capped waits and bodies."""
