"""Audio -> Parquet mel-spectrogram chunks with Ray Data (manifest, decode, mel, chunks, shards)."""
