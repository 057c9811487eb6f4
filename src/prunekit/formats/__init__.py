"""On-disk formats: what every saved folder shares (checksums), GGUF for llama.cpp, one file per format."""
