"""The weight store: its format rules (format.py) and the reader that streams, verifies and decodes it (reader.py)."""
