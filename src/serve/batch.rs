//! `mega batch`: offline generation over a JSONL file (in progress).
