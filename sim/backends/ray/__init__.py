"""The Ray backend: actor lifecycle (backend), actor placement on nodes (placement), cluster
resources, code shipping and data shards (cluster). Importing this package does not import Ray;
only `backend` does.
"""
