"""Audio -> Parquet mel-spectrogram frames with Ray Data (manifest, decode, mel, shards), and the
chunking and frame layout every reader uses."""
