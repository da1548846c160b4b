/*
 * greedy.c: embeds deepport through its C ABI and greedily decodes a few
 * tokens of a DeepSeek-V3 checkpoint.
 *
 *   cc greedy.c -I capi/include -L target/release -ldeepport -o greedy
 *   LD_LIBRARY_PATH=target/release ./greedy golden/model cpu f32 4 801 876 688
 *
 * Arguments: CHECKPOINT_DIR BACKEND MODE N_DECODE PROMPT_TOKEN...
 * Prints one line: "tokens: t1 t2 ... tN" (the greedy continuation).
 */
#include "deepport.h"

#include <stdio.h>
#include <stdlib.h>

static int check(DeepportStatus s, const char *what) {
  if (s != DEEPPORT_STATUS_OK) {
    fprintf(stderr, "%s failed (status %d): %s\n", what, (int)s, deepport_last_error());
    return 1;
  }
  return 0;
}

static unsigned argmax(const float *v, size_t n) {
  size_t best = 0;
  for (size_t i = 1; i < n; i++)
    if (v[i] > v[best]) best = i;
  return (unsigned)best;
}

int main(int argc, char **argv) {
  if (argc < 6) {
    fprintf(stderr, "usage: %s CHECKPOINT BACKEND MODE N_DECODE TOKEN...\n", argv[0]);
    return 2;
  }
  if (deepport_abi_version() != 1) {
    fprintf(stderr, "this program was written for ABI version 1, the library has %u\n",
            deepport_abi_version());
    return 2;
  }
  printf("backends:");
  for (size_t i = 0; i < deepport_backend_count(); i++) {
    const char *name = NULL;
    if (check(deepport_backend_name(i, &name), "deepport_backend_name")) return 1;
    printf(" %s", name);
  }
  printf("\n");

  DeepportBackend *b = NULL;
  if (check(deepport_backend_create(argv[2], &b), "deepport_backend_create")) return 1;
  DeepportDeviceInfo info;
  if (check(deepport_backend_info(b, &info), "deepport_backend_info")) return 1;
  printf("backend %s on %s\n", info.backend, info.device);

  DeepportModel *m = NULL;
  if (check(deepport_model_load(b, argv[1], argv[3], &m), "deepport_model_load")) return 1;
  size_t vocab = deepport_model_vocab(m);
  int n_decode = atoi(argv[4]);
  size_t n_prompt = (size_t)(argc - 5);
  uint32_t *prompt = malloc(n_prompt * sizeof *prompt);
  float *logits = malloc(n_prompt * vocab * sizeof *logits);
  if (!prompt || !logits) return 1;
  for (size_t i = 0; i < n_prompt; i++) prompt[i] = (uint32_t)strtoul(argv[5 + i], NULL, 10);

  if (check(deepport_model_prefill(m, prompt, n_prompt, logits, n_prompt * vocab),
            "deepport_model_prefill"))
    return 1;
  unsigned next = argmax(logits + (n_prompt - 1) * vocab, vocab);
  printf("tokens:");
  for (int i = 0; i < n_decode; i++) {
    printf(" %u", next);
    if (i + 1 == n_decode) break;
    if (check(deepport_model_decode(m, next, logits, vocab), "deepport_model_decode")) return 1;
    next = argmax(logits, vocab);
  }
  printf("\n");

  /* A failing call is a status and a message, never a crash. */
  DeepportBackend *none = NULL;
  DeepportStatus s = deepport_backend_create("no-such-backend", &none);
  printf("unknown backend: status %d: %s\n", (int)s, deepport_last_error());

  free(prompt);
  free(logits);
  deepport_model_free(m);
  deepport_backend_free(b);
  return 0;
}
