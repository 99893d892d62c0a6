"""What to download: filters, manifests (per collection, cohort or mixed identifiers, and
portal manifests), cohort declarations, layouts (directory templates and path safety), the flat
layout and shards.
"""
