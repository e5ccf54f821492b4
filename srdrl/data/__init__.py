"""Data: synthetic off-road scenes, the JSONL dataset and its collate."""
