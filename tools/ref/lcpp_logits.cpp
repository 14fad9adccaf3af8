// Print llama.cpp's logits for every position of a given token-id sequence (no tokenizer involved).
// Reference-side helper for tools/ref/check_gguf.py; built against the llama.cpp tree of
// scripts/build-llama-cpp.sh (see tools/ref/README.md). Not part of elastica.
//
//   lcpp_logits MODEL.gguf IDS [PREFILL]
//     IDS      comma-separated token ids
//     PREFILL  0 (default): one llama_decode over all tokens, logits for every position;
//              n > 0: decode the first n tokens as one batch, then the rest one token per llama_decode
//              (exercises the recurrent-state / KV-cache path).
//   Flash attention is disabled (see below) and the KV cache is f32, so the whole graph runs in f32.
//   Output: one line per position, the n_vocab logits as %.9g separated by spaces.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void quiet_log(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_WARN) {
        fputs(text, stderr);
    }
}

static bool decode_range(llama_context * ctx, const std::vector<llama_token> & ids, int from, int to, int n_vocab,
                         std::vector<std::vector<float>> & out) {
    const int n = to - from;
    llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i]     = ids[from + i];
        batch.pos[i]       = from + i;
        batch.n_seq_id[i]  = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i]    = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "llama_decode failed\n");
        llama_batch_free(batch);
        return false;
    }
    for (int i = 0; i < n; i++) {
        const float * l = llama_get_logits_ith(ctx, i);
        out.emplace_back(l, l + n_vocab);
    }
    llama_batch_free(batch);
    return true;
}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf IDS [PREFILL]\n", argv[0]);
        return 2;
    }
    std::vector<llama_token> ids;
    {
        std::string s = argv[2];
        size_t p = 0;
        while (p < s.size()) {
            size_t q = s.find(',', p);
            if (q == std::string::npos) q = s.size();
            ids.push_back((llama_token) atoi(s.substr(p, q - p).c_str()));
            p = q + 1;
        }
    }
    const int prefill = argc > 3 ? atoi(argv[3]) : 0;

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();

    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "failed to load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx           = 256;
    cp.n_batch         = 256;
    cp.n_ubatch        = 256;
    cp.n_seq_max       = 1;
    cp.n_threads       = 2;
    cp.n_threads_batch = 2;
    cp.type_k          = GGML_TYPE_F32;
    cp.type_v          = GGML_TYPE_F32;
    // Flash attention on the CPU copies the f32 K/V views to f16 before the kernel (~1e-3 logit error
    // on these fixtures); the non-FA path keeps attention in f32.
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf         = true;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "failed to create context\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    const int n       = (int) ids.size();

    std::vector<std::vector<float>> out;
    bool ok = true;
    if (prefill <= 0 || prefill >= n) {
        ok = decode_range(ctx, ids, 0, n, n_vocab, out);
    } else {
        ok = decode_range(ctx, ids, 0, prefill, n_vocab, out);
        for (int t = prefill; ok && t < n; t++) {
            ok = decode_range(ctx, ids, t, t + 1, n_vocab, out);
        }
    }
    if (ok) {
        for (const auto & row : out) {
            for (int v = 0; v < n_vocab; v++) {
                printf(v ? " %.9g" : "%.9g", row[v]);
            }
            printf("\n");
        }
    }
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return ok ? 0 : 1;
}
