// `{{name}}`: an adapterlab metric plugin written in C (bindings by `wit-bindgen c`).
//
// Score `{{score}}_overlap`: the share of the reference's distinct words that also occur in
// the prediction (unigram recall, exact match, case-sensitive). A word is a maximal run of
// bytes other than the six ASCII whitespace characters.
//
// Memory, the rule that matters in C: everything this file *returns* to the host (strings,
// lists, the error string) is freed by the generated post-return code with free(), so it
// must come from malloc (use metric_plugin_string_dup, never metric_plugin_string_set, for
// returned strings). Everything the host *passes in* (the samples) belongs to this code,
// which frees it with the generated *_free function. Strings passed to imports (log) stay
// ours: there metric_plugin_string_set on a literal is fine.

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "metric_plugin.h"

#define NAME "{{name}}"
#define OVERLAP "{{score}}_overlap"

typedef struct {
    const uint8_t *ptr;
    size_t len;
} word_t;

// malloc that never returns NULL: running out of memory traps the plugin (abort), which the
// host reports as this batch's error, as the generated string helpers do.
static void *xmalloc(size_t size) {
    void *p = malloc(size ? size : 1);
    if (!p) abort();
    return p;
}

static bool is_separator(uint8_t c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

// The words of `text` (pointers into it); *words is NULL when it has none. Free *words.
static void split_words(const metric_plugin_string_t *text, word_t **words, size_t *count) {
    *words = NULL;
    *count = 0;
    size_t cap = 0;
    for (size_t i = 0; i < text->len;) {
        if (is_separator(text->ptr[i])) {
            i++;
            continue;
        }
        size_t start = i;
        while (i < text->len && !is_separator(text->ptr[i])) i++;
        if (*count == cap) {
            cap = cap ? cap * 2 : 16;
            word_t *grown = realloc(*words, cap * sizeof(word_t));
            if (!grown) abort();
            *words = grown;
        }
        (*words)[(*count)++] = (word_t){text->ptr + start, i - start};
    }
}

static bool same(word_t a, word_t b) {
    return a.len == b.len && memcmp(a.ptr, b.ptr, a.len) == 0;
}

static bool contains(const word_t *words, size_t count, word_t w) {
    for (size_t i = 0; i < count; i++) {
        if (same(words[i], w)) return true;
    }
    return false;
}

// The overlap of one sample in *value, or an error message (a static string) on failure.
// Quadratic in the word counts: fine for sentences and summaries; for long documents, sort
// the words or use a hash set.
static const char *overlap(const metric_plugin_string_t *prediction,
                           const metric_plugin_string_t *reference, double *value) {
    word_t *pred = NULL, *ref = NULL;
    size_t npred = 0, nref = 0;
    split_words(prediction, &pred, &npred);
    split_words(reference, &ref, &nref);
    size_t distinct = 0, shared = 0;
    for (size_t i = 0; i < nref; i++) {
        if (contains(ref, i, ref[i])) continue;  // counted already
        distinct++;
        if (contains(pred, npred, ref[i])) shared++;
    }
    free(pred);
    free(ref);
    if (distinct == 0) return "reference has no words";
    *value = (double)shared / (double)distinct;
    return NULL;
}

void exports_adapterlab_plugin_metric_info(exports_adapterlab_plugin_metric_metric_info_t *ret) {
    // All of this is freed by the host's post-return call: malloc it (string_dup, malloc).
    metric_plugin_string_dup(&ret->manifest.name, NAME);
    metric_plugin_string_dup(&ret->manifest.version, "0.1.0");
    metric_plugin_string_dup(&ret->manifest.description,
                             "Word overlap: share of the reference's distinct words found in the prediction");
    // Declare every capability you call (ADAPTERLAB_PLUGIN_TYPES_CAPABILITY_EMBED, ..._CHAT).
    ret->manifest.capabilities.len = 2;
    ret->manifest.capabilities.ptr = xmalloc(2 * sizeof(adapterlab_plugin_types_capability_t));
    ret->manifest.capabilities.ptr[0] = ADAPTERLAB_PLUGIN_TYPES_CAPABILITY_LOG;
    ret->manifest.capabilities.ptr[1] = ADAPTERLAB_PLUGIN_TYPES_CAPABILITY_CONFIG;

    ret->scores.len = 1;
    ret->scores.ptr = xmalloc(sizeof(exports_adapterlab_plugin_metric_score_spec_t));
    exports_adapterlab_plugin_metric_score_spec_t *spec = &ret->scores.ptr[0];
    metric_plugin_string_dup(&spec->name, OVERLAP);
    metric_plugin_string_dup(&spec->description,
                             "Distinct reference words that occur in the prediction / distinct reference words");
    spec->min = 0.0;
    spec->max = 1.0;
    spec->higher_is_better = true;
}

bool exports_adapterlab_plugin_metric_score(exports_adapterlab_plugin_metric_list_sample_t *samples,
                                            exports_adapterlab_plugin_metric_batch_result_t *ret,
                                            metric_plugin_string_t *err) {
    size_t n = samples->len;
    ret->corpus.ptr = NULL;
    ret->corpus.len = 0;
    ret->samples.len = n;
    ret->samples.ptr = n ? xmalloc(n * sizeof(exports_adapterlab_plugin_metric_sample_result_t)) : NULL;
    for (size_t i = 0; i < n; i++) {
        exports_adapterlab_plugin_metric_sample_t *s = &samples->ptr[i];
        exports_adapterlab_plugin_metric_sample_result_t *r = &ret->samples.ptr[i];
        double value = 0.0;
        const char *problem = overlap(&s->prediction, &s->reference, &value);
        if (problem) {
            // A problem with one sample is that sample's error; the batch goes on.
            r->tag = EXPORTS_ADAPTERLAB_PLUGIN_METRIC_SAMPLE_RESULT_ERROR;
            metric_plugin_string_dup(&r->val.error, problem);
            continue;
        }
        r->tag = EXPORTS_ADAPTERLAB_PLUGIN_METRIC_SAMPLE_RESULT_SCORES;
        r->val.scores.len = 1;
        r->val.scores.ptr = xmalloc(sizeof(metric_plugin_tuple2_string_f64_t));
        metric_plugin_string_dup(&r->val.scores.ptr[0].f0, OVERLAP);
        r->val.scores.ptr[0].f1 = value;
    }
    // The samples are ours: free them once done with them.
    exports_adapterlab_plugin_metric_list_sample_free(samples);
    // To fail the whole batch instead (a problem of every sample, such as a bad setting):
    //   metric_plugin_string_dup(err, "why"); return false;
    (void)err;

    metric_plugin_string_t line;
    metric_plugin_string_set(&line, "scored a batch");  // an import's argument: not freed by the host
    adapterlab_plugin_log_log(ADAPTERLAB_PLUGIN_LOG_LEVEL_DEBUG, &line);
    return true;
}
