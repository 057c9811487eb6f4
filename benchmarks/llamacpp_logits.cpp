// prunekit-logits: run a GGUF model in llama.cpp on given token ids and write the logits of every position.
//
// Built by `python benchmarks/llamacpp.py build` against the cached llama.cpp (its public llama.h API only).
// Usage: prunekit-logits MODEL.gguf TOKENS.i32 OUT.f32 [THREADS] [KV_TYPE: f32|f16]
//   TOKENS.i32: little-endian int32 token ids (the whole sequence is decoded as one batch, positions 0..n-1)
//   OUT.f32:    float32 logits, n_tokens x n_vocab, row-major; the vocabulary size goes to stdout.
// Nothing here tokenizes: the caller passes exactly the ids prunekit scored, so the comparison is logits only.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

static void quiet(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_WARN) {
        fputs(text, stderr);
    }
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf TOKENS.i32 OUT.f32 [THREADS] [f32|f16]\n", argv[0]);
        return 2;
    }
    const int threads = argc > 4 ? atoi(argv[4]) : 2;
    const bool kv_f16 = argc > 5 && strcmp(argv[5], "f16") == 0;

    FILE * f = fopen(argv[2], "rb");
    if (!f) { fprintf(stderr, "cannot open %s\n", argv[2]); return 1; }
    std::vector<llama_token> ids;
    int32_t t;
    while (fread(&t, sizeof t, 1, f) == 1) ids.push_back(t);
    fclose(f);
    const int n = (int) ids.size();
    if (n == 0) { fprintf(stderr, "no tokens in %s\n", argv[2]); return 1; }

    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n;
    cp.n_batch = n;
    cp.n_ubatch = n;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.type_k = kv_f16 ? GGML_TYPE_F16 : GGML_TYPE_F32;  // f32: compare the weights, not the cache's rounding
    cp.type_v = cp.type_k;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context of %d tokens\n", n); return 1; }

    llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; ++i) {
        batch.token[i] = ids[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "llama_decode failed\n"); return 1; }

    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * out = fopen(argv[3], "wb");
    if (!out) { fprintf(stderr, "cannot write %s\n", argv[3]); return 1; }
    for (int i = 0; i < n; ++i) {
        const float * row = llama_get_logits_ith(ctx, i);
        if (!row || fwrite(row, sizeof(float), n_vocab, out) != (size_t) n_vocab) {
            fprintf(stderr, "cannot read/write the logits of position %d\n", i);
            return 1;
        }
    }
    fclose(out);
    printf("%d\n", n_vocab);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
