"""On-disk formats prunekit writes for other runtimes (GGUF for llama.cpp) and the tools that check them."""
