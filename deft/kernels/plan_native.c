/* Native core of DeFT's host plan: the tree derivations (DFS order, entry index, subtree size, seen
 * lengths) and the KV-guided grouping of deft/kernels/kv_groups.py, bit-identical to the numpy
 * build_groups. Plain C99, no Python API: plan_native.py compiles it once and calls it through ctypes.
 *
 * A plan is two calls, because the caller allocates the packed array (a pinned staging buffer) once its
 * size is known: deft_plan_size derives everything into a caller-owned int64 workspace and writes the
 * sizes into its header; deft_plan_fill then writes the packed int32 array from that workspace.
 * Every buffer is sized from the inputs; inputs that would index outside them (only invalid trees)
 * make the call return a negative code, and the caller falls back to numpy.
 */
#include <stdint.h>
#include <string.h>

typedef int64_t i64;
typedef int32_t i32;

enum { MODE_FLATTEN = 0, MODE_NODE = 1, MODE_NODE_CHUNK = 2 };

/* workspace header (int64 slots); H_SEC .. H_SEC + 7 are the section boundaries of the packed array */
enum {
    H_NEED = 0, H_TOTAL, H_NTILES, H_NCHUNKS, H_NTOK, H_NPART, H_MAXPARTS, H_ROWS, H_K, H_NQ,
    H_SEC = 10,
    H_QT = 18, H_SLOT_PTR, H_SLOTS, H_MODE,
    /* workspace offsets of the arrays deft_plan_fill reads */
    H_KV, H_KOFF, H_KEND, H_KTIN, H_KNEND, H_QIDX, H_QTIN, H_QVIS, H_COUNT, H_BOUNDS, H_CQLO, H_CQHI, H_THR,
    H_CHUNK, /* the chunk size used (chosen here when the caller passed 0 with a chunk policy) */
    H_FILL,  /* query slices: 1 = full tiles then the rest, 0 = near-equal */
    H_SIZE = 40
};
#define N_SECTIONS 7
#define SLIVER_DIV 16 /* kv_groups.SLIVER_DIV */

/* Pre-order DFS with children in increasing id order, as DecodingTree._dfs walks it: returns the number
 * of nodes reached from the first root; unreached nodes (invalid trees) keep entry 0 and size 1.
 * Iterative (first child / next sibling links), so deep chains cost no stack. */
static i64 dfs(i64 n, const i64 *parent, i64 *first, i64 *nxt, i64 *order, i64 *tin, i64 *size)
{
    i64 root = -1;
    for (i64 v = 0; v < n; v++) {
        first[v] = -1;
        nxt[v] = -1;
        tin[v] = 0;
        size[v] = 1;
    }
    for (i64 v = n - 1; v >= 0; v--) {
        i64 p = parent[v];
        if (p >= 0) {
            if (p < n) {
                nxt[v] = first[p];
                first[p] = v;
            }
        } else if (p == -1) {
            root = v; /* the first root, if there are several */
        }
    }
    i64 pos = 0;
    i64 v = root;
    while (v >= 0) { /* each node has one parent, so the walk enters each node at most once */
        if (pos >= n)
            return -1; /* unreachable; keeps the writes in bounds regardless */
        tin[v] = pos;
        order[pos++] = v;
        if (first[v] >= 0) {
            v = first[v];
            continue;
        }
        while (v >= 0) { /* a leaf: close its subtree and every subtree it is the last node of */
            size[v] = pos - tin[v];
            if (nxt[v] >= 0) {
                v = nxt[v];
                break;
            }
            v = parent[v];
        }
    }
    return pos;
}

/* Tokens of each node seen by some query (DecodingTree.node_seen_len): the largest visible count of its
 * own queries, or its full length when a query sits strictly below it. cnt: n scratch. -1 when a query
 * names no node. */
static int seen_len(i64 n, const i64 *slot_ptr, i64 nq, const i64 *qnode, const i64 *qvis, const i64 *tin,
                    const i64 *size, i64 *cnt, i64 *seen)
{
    for (i64 v = 0; v < n; v++) {
        seen[v] = 0;
        cnt[v] = 0;
    }
    if (nq == 0)
        return 0;
    for (i64 j = 0; j < nq; j++) {
        i64 q = qnode[j];
        if (q < 0 || q >= n)
            return -1;
        if (qvis[j] > seen[q])
            seen[q] = qvis[j];
        cnt[tin[q]]++;
    }
    for (i64 e = 1; e < n; e++)
        cnt[e] += cnt[e - 1]; /* queries at entry index <= e */
    for (i64 v = 0; v < n; v++) {
        i64 last = tin[v] + size[v] - 1;
        if (cnt[last] > cnt[tin[v]])
            seen[v] = slot_ptr[v + 1] - slot_ptr[v];
    }
    return 0;
}

/* out: 7 n + 1 int64 = order (first `reached` valid), tin, size, seen, scratch (n), and the sum of seen
 * (DecodingTree.unique_kv_tokens) in out[7 n]. Returns the number
 * of nodes reached, -1 - reached when seen was not computed (slot_ptr NULL or a query outside), or
 * INT64_MIN if the walk failed (never). */
i64 deft_tree_derive(i64 n, const i64 *parent, const i64 *slot_ptr, i64 nq, const i64 *qnode, const i64 *qvis,
                     i64 *out)
{
    i64 *order = out, *tin = out + n, *size = out + 2 * n, *seen = out + 3 * n;
    i64 *first = out + 4 * n, *nxt = out + 5 * n, *cnt = out + 6 * n;
    i64 reached = dfs(n, parent, first, nxt, order, tin, size);
    if (reached < 0)
        return INT64_MIN;
    if (slot_ptr == NULL || seen_len(n, slot_ptr, nq, qnode, qvis, tin, size, cnt, seen) != 0)
        return -1 - reached;
    i64 total = 0;
    for (i64 v = 0; v < n; v++)
        total += seen[v];
    out[7 * n] = total;
    return reached;
}

/* first index i in [0, m) with a[i] >= x, else m (numpy searchsorted, side left) */
static i64 lower_bound(const i64 *a, i64 m, i64 x)
{ /* branch-free steps (a conditional move): the answer's position is data, and mispredictions cost more */
    if (m == 0)
        return 0;
    const i64 *base = a;
    while (m > 1) {
        i64 half = m / 2;
        base = base[half] < x ? base + half : base;
        m -= half;
    }
    return (base - a) + (*base < x);
}

/* lower_bound / upper_bound from a previous answer: exact for any x, a few steps when the xs ascend */
static i64 walk_lower(const i64 *a, i64 m, i64 i, i64 x)
{
    while (i < m && a[i] < x)
        i++;
    while (i > 0 && a[i - 1] >= x)
        i--;
    return i;
}

static i64 walk_upper(const i64 *a, i64 m, i64 i, i64 x)
{
    while (i < m && a[i] <= x)
        i++;
    while (i > 0 && a[i - 1] > x)
        i--;
    return i;
}

static void insertion_by_vis(i64 *a, i64 m, const i64 *vis)
{
    for (i64 i = 1; i < m; i++) {
        i64 x = a[i], key = vis[x], j = i;
        while (j > 0 && vis[a[j - 1]] > key) {
            a[j] = a[j - 1];
            j--;
        }
        a[j] = x;
    }
}

/* stable sort of query indices a[0..m) by vis (ties keep their order): insertion sort on runs of 32,
 * then bottom-up merges through tmp */
static void sort_by_vis(i64 *a, i64 m, const i64 *vis, i64 *tmp)
{
    const i64 run = 32;
    for (i64 lo = 0; lo < m; lo += run)
        insertion_by_vis(a + lo, m - lo < run ? m - lo : run, vis);
    if (m <= run)
        return;
    i64 *src = a, *dst = tmp;
    for (i64 w = run; w < m; w *= 2) {
        for (i64 lo = 0; lo < m; lo += 2 * w) {
            i64 mid = lo + w < m ? lo + w : m, hi = lo + 2 * w < m ? lo + 2 * w : m;
            i64 i = lo, j = mid, o = lo;
            while (i < mid && j < hi)
                dst[o++] = vis[src[j]] < vis[src[i]] ? src[j++] : src[i++];
            while (i < mid)
                dst[o++] = src[i++];
            while (j < hi)
                dst[o++] = src[j++];
        }
        i64 *t = src;
        src = dst;
        dst = t;
    }
    if (src != a)
        memcpy(a, src, (size_t)m * sizeof(i64));
}

static i64 next_pow2(i64 x)
{
    i64 p = 1;
    while (p < x)
        p <<= 1;
    return p;
}

/* the smallest power of two >= 16 holding a chunk's queries x group rows, at most block_m_max
 * (kv_groups.tile_rows) */
static i64 tile_rows(i64 max_q, i64 group, i64 block_m_max)
{
    i64 need = next_pow2((max_q > 1 ? max_q : 1) * group);
    if (need < 16)
        need = 16;
    i64 rows = need < block_m_max ? need : block_m_max;
    i64 g2 = next_pow2(group);
    if (rows < g2)
        rows = g2;
    return rows < 16 ? 16 : rows;
}

/* kept nodes of each chunk's first and last token, cfirst / clast (the cuts are sorted: walks, not
 * searches); -7 when a cut lies outside the kept nodes */
static int chunk_nodes(i64 n_c, const i64 *bounds, const i64 *kend, i64 k, i64 *cfirst, i64 *clast)
{
    for (i64 c = 0, f = 0, l = 0; c < n_c; c++) {
        f = walk_upper(kend, k, f, bounds[c]);
        l = walk_lower(kend, k, l, bounds[c + 1]);
        if (f >= k || l >= k)
            return -7;
        cfirst[c] = f;
        clast[c] = l;
    }
    return 0;
}

/* the DFS entry index past the subtrees of chunk c's nodes: numpy's maximum.reduceat of the subtree ends over
 * the chunks' first nodes, then the last node's */
static i64 chunk_subtree_end(i64 c, i64 n_c, const i64 *cfirst, const i64 *clast, const i64 *knend, i64 k)
{
    i64 f = cfirst[c], l = clast[c];
    i64 stop = c + 1 < n_c ? (cfirst[c + 1] > f ? cfirst[c + 1] : f + 1) : k;
    i64 m = knend[f];
    for (i64 i = f + 1; i < stop; i++)
        if (knend[i] > m)
            m = knend[i];
    return knend[l] > m ? knend[l] : m;
}

/* Derive the plan into ws (ws_cap int64) and its sizes into the header. Returns 0, 1 when ws is too small
 * (ws[H_NEED] says how many int64 it needs; ws_cap >= H_SIZE always), or < 0 on invalid input. The
 * caller checks nq >= 1, slot_ptr has n + 1 entries, group >= 1, chunk_size >= 1 (node mode: any). */
i64 deft_plan_size(i64 n, const i64 *parent, const i64 *slot_ptr, i64 n_slots, const i64 *slots, i64 nq,
                   const i64 *qnode, const i64 *qvis, i64 group, i64 mode, i64 chunk_size, i64 block_m_max,
                   double snap, i64 wide_budget, i64 few_rows, i64 leaf_split, const i64 *chunk_policy,
                   i64 fill_tiles, i64 fill_small, i64 *ws, i64 ws_cap)
{
    if (ws_cap < H_SIZE)
        return -1;
    /* chunk_size 0 with chunk_policy = {kv_heads, chunk_min, chunk_max, target programs}: the chunk size is
     * chosen from the tree's seen tokens, as DeftAttention.chunk_for and kv_groups.flatten_chunk_count do */
    if (mode != MODE_NODE && chunk_size == 0 && chunk_policy != 0
        && (chunk_policy[0] < 1 || chunk_policy[1] < 1 || chunk_policy[2] < 1 || chunk_policy[3] < 0))
        return -2;
    if (n < 1 || nq < 1 || group < 1 || mode < 0 || mode > 2
        || (mode != MODE_NODE && chunk_size < 1 && !(chunk_size == 0 && chunk_policy != 0)))
        return -2;
    i64 fixed = H_SIZE + 12 * n + 1 + 5 * nq + 1;
    if (ws_cap < fixed) {
        ws[H_NEED] = fixed + 6 * n + 1; /* enough for node mode; chunked modes may ask again */
        return 1;
    }
    i64 *p = ws + H_SIZE;
    i64 *first = p, *nxt = p + n, *order = p + 2 * n, *tin = p + 3 * n, *size = p + 4 * n, *seen = p + 5 * n;
    i64 *cnt = p + 6 * n; /* n + 1 */
    i64 *kv = p + 7 * n + 1, *koff = p + 8 * n + 1, *kend = p + 9 * n + 1, *ktin = p + 10 * n + 1,
        *knend = p + 11 * n + 1;
    p += 12 * n + 1;
    i64 *q_idx = p, *q_tin = p + nq, *q_vis = p + 2 * nq, *qtmp = p + 3 * nq, *count = p + 4 * nq; /* nq + 1 */
    p += 5 * nq + 1;

    /* tree derivations */
    i64 reached = dfs(n, parent, first, nxt, order, tin, size);
    if (reached < 0)
        return -3;
    if (seen_len(n, slot_ptr, nq, qnode, qvis, tin, size, cnt, seen) != 0)
        return -4;

    /* kept nodes (a seen token or more) in DFS order and their flat token ranges */
    i64 k = 0, n_tok = 0;
    for (i64 i = 0; i < reached; i++) {
        i64 v = order[i], len = seen[v];
        if (len == 0)
            continue;
        if (len < 0 || slot_ptr[v] < 0 || slot_ptr[v] > n_slots - len)
            return -5;
        kv[k] = v;
        koff[k] = n_tok;
        n_tok += len;
        kend[k] = n_tok;
        ktin[k] = i;
        knend[k] = i + size[v];
        k++;
    }
    if (k == 0)
        return -6;
    if (n_tok >= ((i64)1 << 29)) /* a tile's flags hold its unmasked length above 2 bits of an int32 */
        return -7;
    if (mode == MODE_NODE) {
        chunk_size = 0;
    } else if (chunk_size == 0) {
        i64 heads = chunk_policy[0], want = (chunk_policy[3] + heads - 1) / heads;
        i64 lo = (n_tok + chunk_policy[2] - 1) / chunk_policy[2], hi = (n_tok + chunk_policy[1] - 1) / chunk_policy[1];
        i64 n_c = hi < want ? hi : want;
        if (n_c < lo)
            n_c = lo;
        if (n_c < 1)
            n_c = 1;
        chunk_size = (n_tok + n_c - 1) / n_c;
    }
    ws[H_CHUNK] = chunk_size;

    /* queries sorted by (entry index of their node, visible), ties in index order: a counting sort by
     * entry index (stable), then a stable sort by visible inside each entry index */
    for (i64 e = 0; e <= n; e++)
        cnt[e] = 0;
    for (i64 j = 0; j < nq; j++)
        cnt[tin[qnode[j]] + 1]++;
    for (i64 e = 1; e <= n; e++)
        cnt[e] += cnt[e - 1];
    for (i64 j = 0; j < nq; j++)
        q_idx[cnt[tin[qnode[j]]]++] = j;
    for (i64 s = 0; s < nq;) {
        i64 t = tin[qnode[q_idx[s]]], e = s + 1;
        while (e < nq && tin[qnode[q_idx[e]]] == t)
            e++;
        if (e - s > 1)
            sort_by_vis(q_idx + s, e - s, qvis, qtmp);
        for (; s < e; s++) {
            q_tin[s] = t;
            q_vis[s] = qvis[q_idx[s]];
        }
    }

    /* wide nodes (their subtree's queries x group need two tiles or more: a shared prompt) get long chunks,
     * at most wide_budget (chunk x tile) programs per KV head in all, shared in proportion to tokens x
     * tiles and never shorter than chunk_size; the other nodes keep their cuts, Flatten's runs of them
     * re-cut into equal chunks (kv_groups._wide_node_bounds) */
    i64 *wide_n = first; /* free after the DFS: chunks of each wide kept node, 0 for the others */
    i64 n_wide = 0;
    if (wide_budget > 0 && mode != MODE_NODE) {
        if (block_m_max < 1)
            return -8;
        i64 work = 0, qt_w = block_m_max / group > 0 ? block_m_max / group : 1;
        for (i64 i = 0; i < k; i++) {
            i64 nsub = lower_bound(q_tin, nq, knend[i]) - lower_bound(q_tin, nq, ktin[i]);
            i64 tiles = (nsub * group + block_m_max - 1) / block_m_max;
            /* with filled tiles, a rest that runs as a small tile is not counted against the budget */
            i64 counted = fill_tiles && nsub % qt_w != 0 && (nsub % qt_w) * group <= fill_small ? tiles - 1 : tiles;
            wide_n[i] = tiles >= 2 ? counted : 0;
            if (tiles >= 2) {
                work += (kend[i] - koff[i]) * counted;
                n_wide++;
            }
        }
        if (work < 1)
            work = 1;
        for (i64 i = 0; i < k; i++) {
            if (wide_n[i] == 0)
                continue;
            i64 len = kend[i] - koff[i], most = len / chunk_size + (len % chunk_size != 0);
            i64 c = wide_budget * len / work;
            if (c < 1)
                c = 1;
            wide_n[i] = c < most ? c : most;
        }
    }

    /* chunks: cuts of the flat tokens, bounds[0] = 0 < ... < bounds[n_c] = n_tok */
    i64 n_c;
    if (mode == MODE_NODE)
        n_c = k;
    else if (n_wide > 0) {
        n_c = 0;
        i64 run = 0; /* Flatten: tokens of the current run of other nodes */
        for (i64 i = 0; i < k; i++) {
            i64 len = kend[i] - koff[i];
            if (wide_n[i] > 0) {
                n_c += run / chunk_size + (run % chunk_size != 0) + wide_n[i];
                run = 0;
            } else if (mode == MODE_NODE_CHUNK)
                n_c += len / chunk_size + (len % chunk_size != 0);
            else
                run += len;
        }
        n_c += run / chunk_size + (run % chunk_size != 0);
    }
    else if (mode == MODE_NODE_CHUNK) {
        n_c = 0;
        for (i64 i = 0; i < k; i++) {
            i64 len = kend[i] - koff[i];
            n_c += len / chunk_size + (len % chunk_size != 0);
        }
    } else {
        n_c = n_tok / chunk_size + (n_tok % chunk_size != 0);
        if (n_c < 1)
            n_c = 1;
    }
    /* Flatten's few-query re-cut (few_rows > 0) adds at most Node-Chunk's cuts: room for both */
    i64 cap = n_c;
    if (mode == MODE_FLATTEN && few_rows > 0)
        for (i64 i = 0; i < k; i++) {
            i64 len = kend[i] - koff[i];
            cap += len / chunk_size + (len % chunk_size != 0);
        }
    i64 need = fixed + 6 * cap + 1;
    if (ws_cap < need) {
        ws[H_NEED] = need;
        return 1;
    }
    i64 *bounds = p, *cq_lo = p + cap + 1, *cq_hi = p + 2 * cap + 1, *thr = p + 3 * cap + 1,
        *cfirst = p + 4 * cap + 1, *clast = p + 5 * cap + 1;
    if (mode == MODE_NODE) {
        for (i64 i = 0; i < k; i++)
            bounds[i] = koff[i];
    } else if (n_wide > 0) {
        /* chunk starts: a run [a, b) cut into n equal chunks starts at a + j * (b - a) / n */
        i64 c = 0, run_lo = 0;
        for (i64 i = 0; i <= k; i++) {
            i64 at = i < k ? koff[i] : n_tok;
            if (mode == MODE_FLATTEN && (i == k || wide_n[i] > 0) && at > run_lo) {
                i64 len = at - run_lo, m = len / chunk_size + (len % chunk_size != 0);
                for (i64 j = 0; j < m; j++)
                    bounds[c++] = run_lo + j * len / m;
            }
            if (i == k)
                break;
            i64 len = kend[i] - koff[i];
            if (wide_n[i] > 0) {
                for (i64 j = 0; j < wide_n[i]; j++)
                    bounds[c++] = koff[i] + j * len / wide_n[i];
                run_lo = kend[i];
            } else if (mode == MODE_NODE_CHUNK) {
                for (i64 t = koff[i]; t < kend[i]; t += chunk_size) {
                    bounds[c++] = t;
                    if (chunk_size > kend[i] - t)
                        break;
                }
            }
        }
        n_c = c;
    } else if (mode == MODE_NODE_CHUNK) {
        i64 c = 0;
        for (i64 i = 0; i < k; i++)
            for (i64 t = koff[i]; t < kend[i]; t += chunk_size) {
                bounds[c++] = t;
                if (chunk_size > kend[i] - t)
                    break; /* t + chunk_size would pass the node's end (or overflow) */
            }
    } else {
        /* bounds[i] = i * n_tok // n_c, without a division per cut */
        i64 step = n_tok / n_c, rem = n_tok % n_c, r = 0, x = 0;
        for (i64 i = 0; i < n_c; i++) {
            bounds[i] = x;
            x += step;
            r += rem;
            if (r >= n_c) {
                r -= n_c;
                x++;
            }
        }
        if (snap > 0 && n_c > 1) {
            /* move each inner cut to the nearest node boundary (the lower on a tie) when it lies within
             * int(snap * n_tok / n_c) tokens; the comparison is on integers, as in _snap_to_nodes */
            double tol = snap * (double)n_tok / (double)n_c;
            i64 itol = tol >= 9.0e18 ? INT64_MAX : (i64)tol;
            i64 j = 0;
            for (i64 i = 1; i < n_c; i++) {
                i64 x = bounds[i];
                j = walk_lower(kend, k, j, x);
                i64 lo = koff[j], hi = kend[j], d_lo = x - lo, d_hi = hi - x;
                if ((d_lo < d_hi ? d_lo : d_hi) <= itol)
                    bounds[i] = d_lo <= d_hi ? lo : hi;
            }
            /* drop cuts that coincide with the one before (before the drop) */
            i64 w = 1, prev = bounds[0];
            for (i64 i = 1; i < n_c; i++) {
                i64 x = bounds[i];
                if (x != prev)
                    bounds[w++] = x;
                prev = x;
            }
            if (n_tok == prev) /* the last inner cut snapped onto the end */
                w--;
            n_c = w;
        }
    }
    bounds[n_c] = n_tok;

    /* qpos[e]: the first sorted query at DFS entry index e or later, e = 0..n (reuses cnt) */
    i64 *qpos = cnt;
    for (i64 e = 0, s = 0; e <= n; e++) {
        while (s < nq && q_tin[s] < e)
            s++;
        qpos[e] = s;
    }

    /* Flatten, few_rows > 0: a chunk over several nodes whose queries x group fit few_rows (or, with
     * leaf_split, whose nodes are all leaves) is few; runs of few chunks are merged and re-cut as Node-Chunk
     * cuts (node starts, every chunk_size inside a node) (kv_groups._split_few_query_chunks) */
    if (mode == MODE_FLATTEN && few_rows > 0) {
        i64 any = 0;
        if (chunk_nodes(n_c, bounds, kend, k, cfirst, clast) != 0)
            return -7;
        for (i64 c = 0; c < n_c; c++) {
            i64 f = cfirst[c], l = clast[c], m = chunk_subtree_end(c, n_c, cfirst, clast, knend, k);
            thr[c] = f != l && (qpos[m] - qpos[ktin[f]]) * group <= few_rows;
            if (f != l && !thr[c] && leaf_split) { /* leaf_split: a chunk of leaves only is few too */
                i64 leaves = 1;
                for (i64 i = f; i <= l && leaves; i++)
                    leaves = knend[i] - ktin[i] == 1;
                thr[c] = leaves;
            }
            any |= thr[c];
        }
        if (any) {
            i64 *cut = cq_lo; /* scratch: cq_lo and cq_hi hold 2 * cap entries, the new cuts at most cap + 1 */
            i64 *moved = cq_hi, w = 0, j = 0;
            /* an edge between a few run and a kept chunk, strictly inside a node, moves to that node's nearest
             * Node-Chunk cut (or its end) when that is at most chunk_size / SLIVER_DIV away; every edge is
             * tested against the unmoved bounds, then all move at once (as numpy does) */
            for (i64 c = 1; c < n_c; c++) { /* moved[c] for the inner bounds only: cq_hi holds cap entries */
                moved[c] = bounds[c];
                if (thr[c - 1] == thr[c])
                    continue;
                i64 f = cfirst[c], o = bounds[c] - koff[f], len = kend[f] - koff[f];
                i64 near = (o + chunk_size / 2) / chunk_size * chunk_size;
                i64 to = koff[f] + (near < len ? near : len), d = to > bounds[c] ? to - bounds[c] : bounds[c] - to;
                if (o > 0 && d <= chunk_size / SLIVER_DIV && to > bounds[c - 1] && to < bounds[c + 1])
                    moved[c] = to;
            }
            for (i64 c = 1; c < n_c; c++)
                bounds[c] = moved[c];
            for (i64 c = 0; c < n_c; c++) {
                if (!(c > 0 && thr[c - 1] && thr[c])) /* the start of a merged run, or of a kept chunk */
                    cut[w++] = bounds[c];
                if (!thr[c])
                    continue;
                i64 a = bounds[c], b = bounds[c + 1];
                j = walk_upper(kend, k, j, a); /* the node holding token a */
                for (; j < k && koff[j] < b; j++) {
                    i64 t = koff[j];
                    if (t < a)
                        t += (a - t + chunk_size - 1) / chunk_size * chunk_size;
                    for (; t < b && t < kend[j]; t += chunk_size) {
                        if (t > cut[w - 1])
                            cut[w++] = t;
                        if (chunk_size > kend[j] - t)
                            break;
                    }
                }
                if (j > 0)
                    j--; /* the next chunk may start inside the last node seen */
            }
            for (i64 c = 0; c < w; c++)
                bounds[c] = cut[c];
            n_c = w;
            bounds[n_c] = n_tok;
        }
    }

    if (chunk_nodes(n_c, bounds, kend, k, cfirst, clast) != 0)
        return -7;

    /* a chunk's queries: those below its nodes, the contiguous range [cq_lo, cq_hi) of the sorted order */
    i64 max_q = 0, n_part = 0;
    for (i64 e = 0; e <= nq; e++)
        count[e] = 0;
    for (i64 c = 0; c < n_c; c++) {
        i64 f = cfirst[c], l = clast[c];
        i64 a = qpos[ktin[f]], b = qpos[chunk_subtree_end(c, n_c, cfirst, clast, knend, k)];
        cq_lo[c] = a;
        cq_hi[c] = b;
        if (b - a > max_q)
            max_q = b - a;
        n_part += b - a;
        count[a]++;
        count[b]--;
        /* the mask is needed unless the chunk's first query sees past its end (or is not in its first
         * node): the first node's own queries that stop inside the chunk sort first. numpy finds them
         * by searching the key entry * (n_tok + 1) + visible; visible < n_tok + 1, so that search ends
         * inside the first node's own queries [a, qpos[entry + 1]), sorted by visible */
        if (mode == MODE_FLATTEN && f != l)
            thr[c] = nq + 1;
        else
            thr[c] = a + lower_bound(q_vis + a, qpos[ktin[f] + 1] - a, bounds[c + 1] - koff[f]);
    }
    i64 max_parts = 0;
    for (i64 s = 0; s < nq; s++) {
        if (s > 0)
            count[s] += count[s - 1];
        if (count[s] > max_parts)
            max_parts = count[s];
    }

    i64 rows = tile_rows(max_q, group, block_m_max);
    i64 qt = rows / group;
    i64 n_tiles = 0;
    for (i64 c = 0; c < n_c; c++) {
        i64 cn = cq_hi[c] - cq_lo[c];
        n_tiles += ((cn > 1 ? cn : 1) + qt - 1) / qt;
    }

    i64 sizes[N_SECTIONS] = {6 * n_tiles, n_tok, n_tok, 3 * k, 3 * nq, nq + 1, n_part};
    i64 end = 0;
    ws[H_SEC] = 0;
    for (int i = 0; i < N_SECTIONS; i++) {
        end += sizes[i];
        ws[H_SEC + 1 + i] = end;
    }
    ws[H_NEED] = need;
    ws[H_TOTAL] = end;
    ws[H_NTILES] = n_tiles;
    ws[H_NCHUNKS] = n_c;
    ws[H_NTOK] = n_tok;
    ws[H_NPART] = n_part;
    ws[H_MAXPARTS] = max_parts;
    ws[H_ROWS] = rows;
    ws[H_K] = k;
    ws[H_NQ] = nq;
    ws[H_QT] = qt;
    ws[H_FILL] = fill_tiles != 0;
    ws[H_SLOT_PTR] = (i64)(intptr_t)slot_ptr;
    ws[H_SLOTS] = (i64)(intptr_t)slots;
    ws[H_MODE] = mode;
    ws[H_KV] = kv - ws;
    ws[H_KOFF] = koff - ws;
    ws[H_KEND] = kend - ws;
    ws[H_KTIN] = ktin - ws;
    ws[H_KNEND] = knend - ws;
    ws[H_QIDX] = q_idx - ws;
    ws[H_QTIN] = q_tin - ws;
    ws[H_QVIS] = q_vis - ws;
    ws[H_COUNT] = count - ws;
    ws[H_BOUNDS] = bounds - ws;
    ws[H_CQLO] = cq_lo - ws;
    ws[H_CQHI] = cq_hi - ws;
    ws[H_THR] = thr - ws;
    return 0;
}

/* separate loops over non-aliasing pointers: both vectorise (the per-token part of a plan) */
static void narrow_copy(i32 *restrict dst, const i64 *restrict src, i64 len)
{
    for (i64 t = 0; t < len; t++)
        dst[t] = (i32)src[t];
}

static void fill32(i32 *restrict dst, i32 v, i64 len)
{
    for (i64 t = 0; t < len; t++)
        dst[t] = v;
}

/* Write the packed plan (ws[H_TOTAL] int32) that deft_plan_size derived into ws; the slot arrays it was
 * given must still be alive. Uses the query-sort scratch as the reduction's cursors. */
void deft_plan_fill(i64 *ws, i32 *out)
{
    i64 n_c = ws[H_NCHUNKS], k = ws[H_K], nq = ws[H_NQ], qt = ws[H_QT];
    const i64 *slot_ptr = (const i64 *)(intptr_t)ws[H_SLOT_PTR], *slots = (const i64 *)(intptr_t)ws[H_SLOTS];
    const i64 *kv = ws + ws[H_KV], *koff = ws + ws[H_KOFF], *kend = ws + ws[H_KEND], *ktin = ws + ws[H_KTIN],
              *knend = ws + ws[H_KNEND], *q_idx = ws + ws[H_QIDX], *q_tin = ws + ws[H_QTIN],
              *q_vis = ws + ws[H_QVIS], *count = ws + ws[H_COUNT], *bounds = ws + ws[H_BOUNDS],
              *cq_lo = ws + ws[H_CQLO], *cq_hi = ws + ws[H_CQHI], *thr = ws + ws[H_THR];
    i64 *cursor = ws + ws[H_QIDX] + 3 * nq; /* qtmp: free once the queries are sorted */
    i32 *tiles = out + ws[H_SEC], *tok_slot = out + ws[H_SEC + 1], *tok_node = out + ws[H_SEC + 2],
        *nodes = out + ws[H_SEC + 3], *queries = out + ws[H_SEC + 4], *red_ptr = out + ws[H_SEC + 5],
        *red_idx = out + ws[H_SEC + 6];

    /* tiles: each chunk's queries in near-equal slices, or (H_FILL) in slices of qt and the rest last */
    i64 pbase = 0, fill = ws[H_FILL];
    for (i64 c = 0; c < n_c; c++) {
        i64 a = cq_lo[c], cn = cq_hi[c] - a, th = thr[c];
        i64 nt = ((cn > 1 ? cn : 1) + qt - 1) / qt;
        for (i64 j = 0; j < nt; j++) {
            i64 lo = fill ? a + j * qt : a + j * cn / nt;
            i64 hi = fill ? (j + 1 < nt ? lo + qt : a + cn) : a + (j + 1) * cn / nt;
            tiles[0] = (i32)bounds[c];
            tiles[1] = (i32)bounds[c + 1];
            tiles[2] = (i32)lo;
            tiles[3] = (i32)hi;
            tiles[4] = (i32)(pbase + lo - a);
            tiles[5] = lo < th;
            tiles += 6;
        }
        pbase += cn;
    }

    /* per token (DFS-flat): pool slot and kept-node index; per kept node: offset, entry, subtree end */
    for (i64 i = 0; i < k; i++) {
        i64 o = koff[i], len = kend[i] - o;
        narrow_copy(tok_slot + o, slots + slot_ptr[kv[i]], len);
        fill32(tok_node + o, (i32)i, len);
        nodes[3 * i] = (i32)o;
        nodes[3 * i + 1] = (i32)ktin[i];
        nodes[3 * i + 2] = (i32)knend[i];
    }
    for (i64 s = 0; s < nq; s++) {
        queries[3 * s] = (i32)q_idx[s];
        queries[3 * s + 1] = (i32)q_tin[s];
        queries[3 * s + 2] = (i32)q_vis[s];
    }

    /* final tile flags (TILE_FIELDS in kv_groups.py): a masked tile keeps as an unmasked prefix the tokens
     * of its first node f that all its queries see (all in f's subtree; the first, the least-seeing of
     * those in f itself, bounds it); then bit 1: the prefix's slots are consecutive; bits 2..: its length */
    i32 *tile = out + ws[H_SEC];
    i64 prev_lo = -1, prev_len = -1, contig = 0; /* a chunk's tiles are neighbours: test its slots once */
    for (i64 i = 0; i < ws[H_NTILES]; i++, tile += 6) {
        i64 lo = tile[0], hi = tile[1], qlo = tile[2], qhi = tile[3], len = hi - lo;
        if (tile[5] & 1) {
            len = 0;
            if (qhi > qlo) {
                i64 f = tok_node[lo], first = qlo, last = qhi - 1;
                i64 stop = q_tin[first] == ktin[f] ? koff[f] + q_vis[first] : kend[f];
                if (stop > hi)
                    stop = hi;
                if (q_tin[last] < knend[f] && stop > lo)
                    len = stop - lo;
            }
        }
        if (lo != prev_lo || len != prev_len) {
            contig = len > 0;
            for (i64 t = lo + 1; contig && t < lo + len; t++)
                contig = (i64)tok_slot[t] == (i64)tok_slot[lo] + (t - lo);
            prev_lo = lo;
            prev_len = len;
        }
        tile[5] = (i32)((len < hi - lo) | (contig << 1) | (len << 2));
    }

    /* global reduction: sorted query s -> its partial rows in chunk order (numpy's stable argsort) */
    red_ptr[0] = 0;
    i64 acc = 0;
    for (i64 s = 0; s < nq; s++) {
        cursor[s] = acc;
        acc += count[s];
        red_ptr[s + 1] = (i32)acc;
    }
    pbase = 0;
    for (i64 c = 0; c < n_c; c++) {
        i64 a = cq_lo[c], b = cq_hi[c];
        for (i64 s = a; s < b; s++)
            red_idx[cursor[s]++] = (i32)(pbase + s - a);
        pbase += b - a;
    }
}

/* Longest-first launch order (kv_groups.order_tiles_longest_first, bit-identical): reorder the n 6-field
 * tile records in place by estimated cost, highest first, ties in their current order. cost = (tokens +
 * masked tokens) x (big ? lpt_big : lpt_small) + lpt_program, a tile being big when its queries x group
 * exceed small_rows. Scratch: 6 x n int64 from the caller (negated costs, index, sort buffer, records copy);
 * the stable sort is the queries' (sort_by_vis), ascending on the negated cost. With mix > 0 and both kinds
 * present, big and small tiles then alternate (each kind keeps its order, the longer list's rest at the end)
 * when the costliest big tile x slots <= mix x the total cost: the big programs are then not the step's
 * critical path, and an SM running one of each kind (tensor-bound and HBM-bound) finishes sooner. */
i64 deft_order_tiles(i32 *tiles, i64 n, i64 group, i64 small_rows, i64 lpt_big, i64 lpt_small,
                     i64 lpt_program, double mix, double slots, i64 *scratch)
{
    /* returns the tile classes the plan holds (kv_groups.tile_classes, bits 1 / 2 / 4: big unmasked over
     * consecutive slots / big unmasked otherwise / big masked; 8 / 16: small unmasked / small masked) */
    i64 classes = 0;
    for (i64 i = 0; i < n; i++) {
        const i32 *t = tiles + 6 * i;
        const int big = ((i64)t[3] - t[2]) * group > small_rows;
        classes |= (t[5] & 1) ? (big ? 4 : 16) : (big ? ((t[5] & 2) ? 1 : 2) : 8);
    }
    if (n < 2)
        return classes;
    i64 *neg_cost = scratch, *idx = scratch + n, *tmp = scratch + 2 * n;
    i32 *copy = (i32 *)(scratch + 3 * n); /* 6 x n int32 = 3 x n int64 */
    i64 total = 0, max_big = -1, n_big = 0;
    for (i64 i = 0; i < n; i++) {
        const i32 *t = tiles + 6 * i;
        i64 n_tok = (i64)t[1] - t[0], masked = n_tok - ((i64)t[5] >> 2);
        i64 big = ((i64)t[3] - t[2]) * group > small_rows;
        i64 cost = (n_tok + masked) * (big ? lpt_big : lpt_small) + lpt_program;
        neg_cost[i] = -cost;
        idx[i] = i;
        total += cost;
        if (big) {
            n_big++;
            if (cost > max_big)
                max_big = cost;
        }
    }
    sort_by_vis(idx, n, neg_cost, tmp);
    if (mix > 0 && n_big > 0 && n_big < n && (double)max_big * slots <= mix * (double)total) {
        /* split the sorted order into its big and small tiles (tmp), then alternate them back into idx */
        i64 nb = 0, ns = 0;
        i64 *bigs = tmp, *smalls = tmp + n_big;
        for (i64 i = 0; i < n; i++) {
            const i32 *t = tiles + 6 * idx[i];
            if (((i64)t[3] - t[2]) * group > small_rows)
                bigs[nb++] = idx[i];
            else
                smalls[ns++] = idx[i];
        }
        i64 o = 0, b = 0, s = 0;
        while (b < nb || s < ns) {
            if (b < nb)
                idx[o++] = bigs[b++];
            if (s < ns)
                idx[o++] = smalls[s++];
        }
    }
    memcpy(copy, tiles, (size_t)(6 * n) * sizeof(i32));
    for (i64 i = 0; i < n; i++)
        memcpy(tiles + 6 * i, copy + 6 * idx[i], 6 * sizeof(i32));
    return classes;
}

/* prompt_kernel="gluon" (deft/kernels/prompt_gluon.py, partition_prompt_tiles; the numpy version there is the
 * reference): the tiles the Gluon prompt kernel runs (rows in (small_rows, max_rows], no masked phase, consecutive
 * slots, at least min_tokens tokens) first, stably sorted by token range, those of a range two by two (a CTA's
 * pair), then each odd range's last one, then every other tile in its order. Returns that kernel's tile count and
 * its pairs in *n_pairs. scratch: 9 x n int64. */
i64 deft_prompt_partition(i32 *tiles, i64 n, i64 group, i64 small_rows, i64 max_rows, i64 min_tokens, i64 *scratch,
                          i64 *n_pairs)
{
    i64 *key = scratch, *idx = scratch + n, *rest = scratch + 2 * n, *tmp = scratch + 3 * n;
    i64 *order = scratch + 4 * n, *singles = scratch + 5 * n;
    i32 *copy = (i32 *)(scratch + 6 * n); /* 6 x n int32 = 3 x n int64 */
    i64 m = 0, r = 0;
    *n_pairs = 0;
    for (i64 i = 0; i < n; i++) {
        const i32 *t = tiles + 6 * i;
        i64 rows = ((i64)t[3] - t[2]) * group;
        if (rows > small_rows && rows <= max_rows && !(t[5] & 1) && (t[5] & 2) && (i64)t[1] - t[0] >= min_tokens) {
            key[i] = ((i64)t[0] << 32) | (i64)(uint32_t)t[1];
            idx[m++] = i;
        } else {
            rest[r++] = i;
        }
    }
    if (m == 0)
        return 0;
    sort_by_vis(idx, m, key, tmp);
    i64 o = 0, s = 0;
    for (i64 a = 0; a < m;) {
        i64 b = a + 1;
        while (b < m && key[idx[b]] == key[idx[a]])
            b++;
        i64 even = (b - a) & ~(i64)1;
        for (i64 k = 0; k < even; k++)
            order[o++] = idx[a + k];
        if (even < b - a)
            singles[s++] = idx[b - 1];
        a = b;
    }
    *n_pairs = o / 2;
    for (i64 k = 0; k < s; k++)
        order[o++] = singles[k];
    for (i64 k = 0; k < r; k++)
        order[o++] = rest[k];
    memcpy(copy, tiles, (size_t)(6 * n) * sizeof(i32));
    for (i64 i = 0; i < n; i++)
        memcpy(tiles + 6 * i, copy + 6 * order[i], 6 * sizeof(i32));
    return m;
}

/* prompt_kernel="gluon" with prompt_share (DeftAttention._prompt_share; its numpy form is the reference): the wide
 * nodes, those with more than block_m rows (queries x group) in their subtree, of a derived tree (order: its
 * pre-order DFS of `reached` nodes; seen: node_seen_len). out[0] = their seen tokens, out[1] = the most rows any of
 * them has (0: none is wide). cnt: n int64 of scratch. */
void deft_wide_tokens(i64 n, i64 reached, const i64 *order, const i64 *parent, const i64 *seen, i64 nq,
                      const i64 *qnode, i64 group, i64 block_m, i64 *cnt, i64 *out)
{
    i64 tok = 0, most = 0;
    for (i64 v = 0; v < n; v++)
        cnt[v] = 0;
    for (i64 j = 0; j < nq; j++)
        cnt[qnode[j]]++;
    for (i64 k = reached - 1; k > 0; k--) /* reverse pre-order: a node's subtree is summed before its parent */
        cnt[parent[order[k]]] += cnt[order[k]];
    for (i64 v = 0; v < n; v++) {
        i64 rows = cnt[v] * group;
        if (rows > block_m) {
            tok += seen[v];
            most = rows > most ? rows : most;
        }
    }
    out[0] = tok;
    out[1] = most;
}
