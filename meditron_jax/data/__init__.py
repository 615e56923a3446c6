"""The data path: meditron-prepare (prepare.py) writes token shards; the grain loader
(loader.py) turns them into packed, mixed, resumable batches. See DESIGN.md's data flow."""
