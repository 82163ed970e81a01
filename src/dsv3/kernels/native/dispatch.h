/* The exported entry points (included at the end of dsv3_kernels.c): one GEMV and one fused MoE.
 * Return 0, or a negative code the loader turns into one line: -1 no ISA, -2 bad argument, -3 no memory. */

#define ROW_CHUNK 16 /* output rows per MoE work item */

static int check_fmt(int fmt, int K, int group) {
    if (fmt < 0 || fmt >= N_FMT || K <= 0) return -2;
    if ((fmt == FMT_I4 || fmt == FMT_I4Q) && (group < 32 || group % 32 || K % group)) return -2;
    return 0;
}

typedef struct { const gemv_args *a; rows_fn f; int N; } gemv_job;

static void gemv_body(void *p, int tid, int nth) {
    const gemv_job *j = (const gemv_job *)p;
    int per = ((j->N + nth - 1) / nth + 3) & ~3; /* whole 4-row tiles per thread */
    int n0 = tid * per, n1 = n0 + per < j->N ? n0 + per : j->N;
    if (n0 < n1) j->f(j->a, n0, n1);
}

/* y [M, N] = x [M, K] @ dequant(w [N, K])^T. */
int dsv3_gemv(int fmt, const float *x, int M, int K, const void *w, const void *s, const float *aux, float *y, int N,
              int group, int nt) {
    if (isa_cap == ISA_NONE || TABLES[isa_cap] == NULL) return -1;
    if (check_fmt(fmt, K, group) || M <= 0 || N <= 0) return -2;
    gemv_args a = {x, NULL, NULL, NULL, (size_t)K, M, K, group, w, s, aux, y, (size_t)N};
    int8_t *xq = NULL;
    float *xs = NULL, *xg = NULL;
    if (fmt == FMT_W8A8 || fmt == FMT_I8Q || fmt == FMT_I4Q) {
        xq = (int8_t *)malloc((size_t)M * K);
        xs = (float *)malloc(sizeof(float) * (size_t)M * (K / QB + 1));
        xg = (float *)malloc(sizeof(float) * (size_t)M * (K / QB + 1));
        if (!xq || !xs || !xg) { free(xq); free(xs); free(xg); return -3; }
        if (fmt == FMT_W8A8) quant_rows(x, K, M, K, xq, xs);
        else quant_blocks(x, K, M, K, fmt == FMT_I4Q ? group : 0, xq, xs, xg);
        a.xq = xq, a.xs = xs, a.xg = xg;
    }
    gemv_job j = {&a, TABLES[isa_cap][fmt], N};
    run_parallel(gemv_body, &j, nt);
    free(xq);
    free(xs);
    free(xg);
    return 0;
}

/* ---------------------------------------------------------------------------------------- fused MoE */
static size_t w_bytes(int fmt, int N, int K) {
    size_t nk = (size_t)N * K;
    return fmt == FMT_I4 || fmt == FMT_I4Q ? nk / 2 : fmt == FMT_BF16 ? 2 * nk : fmt == FMT_F32 ? 4 * nk : nk;
}
static size_t s_elems(int fmt, int N, int K, int group) { /* per expert, in the scale array's own elements */
    if (fmt == FMT_I8 || fmt == FMT_W8A8 || fmt == FMT_I8Q) return (size_t)N;
    if (fmt == FMT_I4 || fmt == FMT_I4Q) return (size_t)N * (K / group) * 2;
    if (fmt == FMT_FP8) return (size_t)((N + 127) / 128) * ((K + 127) / 128);
    return 0;
}

typedef struct { int e, n0, n1; } moe_item;
typedef struct {
    int fmt, D, I, group, nitems;
    const moe_item *items;
    const int *start, *count;        /* per expert: first slot, slots */
    const void *w[3], *s[3];         /* gate, up, down */
    const float *aux[3];
    const float *xs; const int8_t *xsq; const float *xss, *xsg; /* gathered tokens [S, D] (+ quantised) */
    float *g, *u; const int8_t *hq; const float *hs, *hg;     /* [S, I]: gate, up -> h = silu(gate) * up */
    float *ys;                                               /* [S, D] */
    int phase;
} moe_job;

static gemv_args moe_args(const moe_job *j, int p, int e) {
    const int N = p == 2 ? j->D : j->I, K = p == 2 ? j->I : j->D;
    const size_t so = (size_t)e * s_elems(j->fmt, N, K, j->group);
    const size_t st = (size_t)j->start[e];
    gemv_args a = {p == 2 ? j->g + st * K : j->xs + st * K, NULL, NULL, NULL, (size_t)K, j->count[e], K, j->group,
                   (const char *)j->w[p] + (size_t)e * w_bytes(j->fmt, N, K), NULL, NULL,
                   p == 2 ? j->ys + st * N : (p == 0 ? j->g : j->u) + st * N, (size_t)N};
    if (j->fmt == FMT_I4 || j->fmt == FMT_I4Q) a.s = (const uint16_t *)j->s[p] + so;
    else if (j->fmt != FMT_BF16 && j->fmt != FMT_FP8) a.s = (const float *)j->s[p] + so;
    if (j->fmt == FMT_FP8) a.aux = j->aux[p] + so;
    if (j->fmt == FMT_W8A8) {
        a.xq = p == 2 ? j->hq + st * K : j->xsq + st * K;
        a.xs = p == 2 ? j->hs + st : j->xss + st;
    } else if (j->fmt == FMT_I8Q || j->fmt == FMT_I4Q) { /* per-block scales, per-group sums: rows of K / QB */
        const size_t per = (size_t)(K / QB);
        a.xq = p == 2 ? j->hq + st * K : j->xsq + st * K;
        a.xs = (p == 2 ? j->hs : j->xss) + st * per;
        if (j->fmt == FMT_I4Q) a.xg = (p == 2 ? j->hg : j->xsg) + st * (size_t)(K / j->group);
    }
    return a;
}

static void moe_body(void *p, int tid, int nth) {
    const moe_job *j = (const moe_job *)p;
    const rows_fn f = TABLES[isa_cap][j->fmt];
    int i0 = (int)((long)j->nitems * tid / nth), i1 = (int)((long)j->nitems * (tid + 1) / nth);
    for (int i = i0; i < i1; i++) {
        const moe_item *it = &j->items[i];
        if (j->phase == 0) {
            gemv_args ga = moe_args(j, 0, it->e), ua = moe_args(j, 1, it->e);
            f(&ga, it->n0, it->n1);
            f(&ua, it->n0, it->n1);
            for (int m = 0; m < ga.M; m++)
                for (int n = it->n0; n < it->n1; n++) {
                    float gv = ga.y[(size_t)m * j->I + n];
                    ga.y[(size_t)m * j->I + n] = gv / (1.0f + expf(-gv)) * ua.y[(size_t)m * j->I + n];
                }
        } else {
            gemv_args da = moe_args(j, 2, it->e);
            f(&da, it->n0, it->n1);
        }
    }
}

static int moe_items(moe_item *items, const int *count, int E, int N) {
    int n = 0;
    for (int e = 0; e < E; e++)
        if (count[e])
            for (int r = 0; r < N; r += ROW_CHUNK) items[n++] = (moe_item){e, r, r + ROW_CHUNK < N ? r + ROW_CHUNK : N};
    return n;
}

/* out [T, D] = sum_j wts[t, j] * expert_{idx[t, j]}(x[t]), expert(x) = down(silu(gate x) * up x), all experts'
 * weights stacked: gate/up [E, I, D], down [E, D, I] in format `fmt`. */
int dsv3_moe(int fmt, const float *x, int T, int D, int I, int topk, const int64_t *idx, const float *wts, int E,
             const void *const *w, const void *const *s, const float *const *aux, int group, float *out, int nt) {
    if (isa_cap == ISA_NONE || TABLES[isa_cap] == NULL) return -1;
    if (check_fmt(fmt, D, group) || check_fmt(fmt, I, group) || T <= 0 || topk <= 0 || E <= 0) return -2;
    const int S = T * topk;
    for (int i = 0; i < S; i++)
        if (idx[i] < 0 || idx[i] >= E) return -2;
    int *count = calloc(E, sizeof(int)), *start = calloc(E, sizeof(int)), *slot_of = malloc(sizeof(int) * S);
    size_t nitems_max = (size_t)E * ((D > I ? D : I) / ROW_CHUNK + 1);
    moe_item *items = malloc(sizeof(moe_item) * nitems_max);
    float *xs = malloc(sizeof(float) * S * (size_t)D), *ys = malloc(sizeof(float) * S * (size_t)D);
    float *g = malloc(sizeof(float) * S * (size_t)I), *u = malloc(sizeof(float) * S * (size_t)I);
    const int aq = fmt == FMT_W8A8 || fmt == FMT_I8Q || fmt == FMT_I4Q; /* activations quantised */
    const size_t dmax = (size_t)(D > I ? D : I);
    int8_t *q = aq ? malloc(S * dmax) : NULL;
    float *qs = aq ? malloc(sizeof(float) * S * (dmax / QB + 1)) : NULL, *qg = aq ? malloc(sizeof(float) * S * (dmax / QB + 1)) : NULL;
    int rc = 0;
    if (!count || !start || !slot_of || !items || !xs || !ys || !g || !u || (aq && (!q || !qs || !qg))) {
        rc = -3;
        goto done;
    }
    for (int i = 0; i < S; i++) count[idx[i]]++;
    for (int e = 1; e < E; e++) start[e] = start[e - 1] + count[e - 1];
    {
        int *fill = calloc(E, sizeof(int));
        if (!fill) { rc = -3; goto done; }
        for (int i = 0; i < S; i++) { /* stable: a token's slots in order, tokens in order, per expert */
            int e = (int)idx[i], sl = start[e] + fill[e]++;
            slot_of[i] = sl;
            memcpy(xs + (size_t)sl * D, x + (size_t)(i / topk) * D, sizeof(float) * D);
        }
        free(fill);
    }
    moe_job j = {fmt, D, I, group, 0, items, start, count, {w[0], w[1], w[2]}, {s[0], s[1], s[2]},
                 {aux[0], aux[1], aux[2]}, xs, q, qs, qg, g, u, q, qs, qg, ys, 0};
    const int qgroup = fmt == FMT_I4Q ? group : 0;
    if (fmt == FMT_W8A8) quant_rows(xs, D, S, D, q, qs);
    else if (aq) quant_blocks(xs, D, S, D, qgroup, q, qs, qg);
    j.nitems = moe_items(items, count, E, I);
    run_parallel(moe_body, &j, nt);
    if (fmt == FMT_W8A8) quant_rows(g, I, S, I, q, qs); /* h, quantised per token for the down projection */
    else if (aq) quant_blocks(g, I, S, I, qgroup, q, qs, qg);
    j.phase = 1;
    j.nitems = moe_items(items, count, E, D);
    run_parallel(moe_body, &j, nt);
    for (int t = 0; t < T; t++) {
        float *o = out + (size_t)t * D;
        memset(o, 0, sizeof(float) * D);
        for (int k = 0; k < topk; k++) {
            const float wt = wts[(size_t)t * topk + k], *yr = ys + (size_t)slot_of[t * topk + k] * D;
            for (int d = 0; d < D; d++) o[d] += wt * yr[d];
        }
    }
done:
    free(count), free(start), free(slot_of), free(items), free(xs), free(ys), free(g), free(u), free(q), free(qs), free(qg);
    return rc;
}
