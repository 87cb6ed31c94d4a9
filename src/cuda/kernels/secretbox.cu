// XSalsa20-Poly1305 open-in-place (libsodium crypto_secretbox_open_detached) over chunks that are
// already in device memory. Compiled at run time with NVRTC (src/cuda/nvrtc.rs) and, for the
// tests, as plain C++ on the host with TZ_HOST_EMULATION defined (tests/cuda_kernel_host.rs),
// where the thread/block loops of the kernels below are run one after another.
//
// Two kernels per launch, on the same stream:
//   tz_secretbox_verify   Poly1305 over each chunk's ciphertext, in parallel within the chunk,
//                         compared in constant time with the chunk's MAC; the verdict goes to
//                         the chunk's slot (TZ_AUTHENTIC or TZ_FORGED).
//   tz_secretbox_decrypt  XOR with the XSalsa20 keystream, only for chunks whose slot says
//                         TZ_AUTHENTIC: a forged chunk stays ciphertext, as with libsodium.
//
// Parallel Poly1305: the tag is (sum_i n_i * r^(nb - i) mod p) + s over the message blocks
// n_0..n_{nb-1} (nb = ceil(len / 16)). A chunk is laid out right-aligned over ntiles * TB
// virtual blocks (TB = TZ_VT * TZ_VM): the pad of zero blocks in front contributes nothing,
// so every thread owns exactly TZ_VM consecutive virtual blocks and every tile TB of them.
// Each thread evaluates its blocks by Horner's rule, the tile combines the 256 partials in a
// tree (left * r^(len right) + right, with the powers r^(VM * 2^k)), scales its sum by
// r^(TB * tiles after it) and adds it, limb by limb, into the chunk's slot with 64-bit atomics;
// the tile that arrives last reduces the sum, adds s and compares.
//
// Keys reach the device only inside the kernel arguments (tz_open_args, by value).

#ifdef TZ_HOST_EMULATION
#include <stdint.h>
#include <string.h>
typedef uint8_t u8;
typedef uint32_t u32;
typedef uint64_t u64;
#define TZ_DEV static inline
#else
typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;
#define TZ_DEV __device__ __forceinline__
#endif

#define TZ_MAX_CHUNKS 32
#define TZ_VT 256   // threads per verify block
#define TZ_VM 16    // Poly1305 blocks per verify thread
#define TZ_VLEVELS 8  // log2(TZ_VT)
#define TZ_DT 256   // threads per decrypt block
#define TZ_DK 4     // keystream blocks per decrypt thread
#define TZ_PENDING 0u
#define TZ_AUTHENTIC 1u
#define TZ_FORGED 2u

// One chunk to open: its device address and length, its nonce and MAC, and the status slot
// its verdict goes to. 64 bytes; the layout is mirrored by src/cuda/secretbox.rs.
struct tz_chunk {
    u64 data;
    u64 len;
    u8 nonce[24];
    u8 mac[16];
    u32 slot;
    u32 reserved;
};

// The kernel argument (by value; 2096 bytes, within the 4 KiB every architecture accepts).
struct tz_open_args {
    u8 key[32];
    u64 slots;  // device address of tz_slot[nslots]
    u32 nslots;
    u32 nchunks;
    tz_chunk chunks[TZ_MAX_CHUNKS];
};

// A chunk's status: the verdict, and the verify kernel's scratch (reset by the last tile).
struct tz_slot {
    u64 acc[5];
    u32 arrived;
    u32 verdict;
};

// 16-byte loads and stores (vector instructions on the device; memcpy on the host, so that the
// host tests run the same aligned paths).
#ifdef TZ_HOST_EMULATION
struct uint4 {
    u32 x, y, z, w;
};
TZ_DEV uint4 tz_ld16(const u8* p) {
    uint4 v;
    memcpy(&v, p, 16);
    return v;
}
TZ_DEV void tz_st16(u8* p, uint4 v) { memcpy(p, &v, 16); }
#else
TZ_DEV uint4 tz_ld16(const u8* p) { return *(const uint4*)p; }
TZ_DEV void tz_st16(u8* p, uint4 v) { *(uint4*)p = v; }
#endif

static_assert(sizeof(tz_chunk) == 64, "tz_chunk layout");
static_assert(sizeof(tz_open_args) == 2096, "tz_open_args layout");
static_assert(sizeof(tz_slot) == 48, "tz_slot layout");

// ------------------------------------------------------------------------------------ Salsa20

TZ_DEV u32 tz_rotl(u32 x, int n) {
#ifdef TZ_HOST_EMULATION
    return (x << n) | (x >> (32 - n));
#else
    return __funnelshift_l(x, x, n);
#endif
}

TZ_DEV u32 tz_le32(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

#define TZ_QR(a, b, c, d)            \
    x[b] ^= tz_rotl(x[a] + x[d], 7);  \
    x[c] ^= tz_rotl(x[b] + x[a], 9);  \
    x[d] ^= tz_rotl(x[c] + x[b], 13); \
    x[a] ^= tz_rotl(x[d] + x[c], 18);

TZ_DEV void tz_rounds(u32 x[16]) {
    for (int i = 0; i < 10; i++) {
        TZ_QR(0, 4, 8, 12) TZ_QR(5, 9, 13, 1) TZ_QR(10, 14, 2, 6) TZ_QR(15, 3, 7, 11)
        TZ_QR(0, 1, 2, 3) TZ_QR(5, 6, 7, 4) TZ_QR(10, 11, 8, 9) TZ_QR(15, 12, 13, 14)
    }
}

// HSalsa20(key, nonce[0..16]) as 8 words.
TZ_DEV void tz_hsalsa20(const u8 key[32], const u8 nonce[24], u32 out[8]) {
    u32 x[16];
    x[0] = 0x61707865u; x[5] = 0x3320646eu; x[10] = 0x79622d32u; x[15] = 0x6b206574u;
    for (int i = 0; i < 4; i++) {
        x[1 + i] = tz_le32(key + 4 * i);
        x[11 + i] = tz_le32(key + 16 + 4 * i);
        x[6 + i] = tz_le32(nonce + 4 * i);
    }
    tz_rounds(x);
    out[0] = x[0]; out[1] = x[5]; out[2] = x[10]; out[3] = x[15];
    out[4] = x[6]; out[5] = x[7]; out[6] = x[8]; out[7] = x[9];
}

// Salsa20 keystream block `counter` under (subkey, nonce[16..24]).
TZ_DEV void tz_salsa20_block(const u32 k[8], const u8 nonce[24], u64 counter, u32 out[16]) {
    u32 in[16];
    in[0] = 0x61707865u; in[5] = 0x3320646eu; in[10] = 0x79622d32u; in[15] = 0x6b206574u;
    for (int i = 0; i < 4; i++) {
        in[1 + i] = k[i];
        in[11 + i] = k[4 + i];
    }
    in[6] = tz_le32(nonce + 16);
    in[7] = tz_le32(nonce + 20);
    in[8] = (u32)counter;
    in[9] = (u32)(counter >> 32);
    u32 x[16];
    for (int i = 0; i < 16; i++) x[i] = in[i];
    tz_rounds(x);
    for (int i = 0; i < 16; i++) out[i] = x[i] + in[i];
}

// ------------------------------------------------------------------------------------ Poly1305
// Numbers mod p = 2^130 - 5 in five 26-bit limbs (the limbs may exceed 26 bits by a little
// between operations; products are summed in 64 bits).

#define TZ_M26 0x3ffffffu

TZ_DEV void tz_pmul(u32 h[5], const u32 a[5], const u32 b[5]) {
    u64 b1 = b[1] * 5ull, b2 = b[2] * 5ull, b3 = b[3] * 5ull, b4 = b[4] * 5ull;
    u64 d0 = (u64)a[0] * b[0] + a[1] * b4 + a[2] * b3 + a[3] * b2 + a[4] * b1;
    u64 d1 = (u64)a[0] * b[1] + (u64)a[1] * b[0] + a[2] * b4 + a[3] * b3 + a[4] * b2;
    u64 d2 = (u64)a[0] * b[2] + (u64)a[1] * b[1] + (u64)a[2] * b[0] + a[3] * b4 + a[4] * b3;
    u64 d3 = (u64)a[0] * b[3] + (u64)a[1] * b[2] + (u64)a[2] * b[1] + (u64)a[3] * b[0] + a[4] * b4;
    u64 d4 = (u64)a[0] * b[4] + (u64)a[1] * b[3] + (u64)a[2] * b[2] + (u64)a[3] * b[1] + (u64)a[4] * b[0];
    u64 c;
    c = d0 >> 26; d1 += c;
    c = d1 >> 26; d2 += c;
    c = d2 >> 26; d3 += c;
    c = d3 >> 26; d4 += c;
    c = d4 >> 26;
    u64 e0 = (d0 & TZ_M26) + c * 5;
    h[0] = (u32)(e0 & TZ_M26);
    h[1] = (u32)(d1 & TZ_M26) + (u32)(e0 >> 26);
    h[2] = (u32)(d2 & TZ_M26);
    h[3] = (u32)(d3 & TZ_M26);
    h[4] = (u32)(d4 & TZ_M26);
}

// h = a + b, carried so that the limbs stay near 26 bits.
TZ_DEV void tz_padd(u32 h[5], const u32 a[5], const u32 b[5]) {
    u32 c = 0;
    for (int i = 0; i < 5; i++) {
        u32 t = a[i] + b[i] + c;
        h[i] = t & TZ_M26;
        c = t >> 26;
    }
    h[0] += c * 5;
}

TZ_DEV void tz_pcopy(u32 d[5], const u32 s[5]) {
    for (int i = 0; i < 5; i++) d[i] = s[i];
}

// Reduce five limbs of up to 64 bits each (the sum of many reduced numbers) to the unique
// representative below p, as canonical 26-bit limbs.
TZ_DEV void tz_freeze(u32 out[5], const u64 in[5]) {
    u64 d[5];
    for (int i = 0; i < 5; i++) d[i] = in[i];
    // Carry chains, folding the carry out of the top limb back in as 5 * carry (2^130 = 5 mod p):
    // after three, every limb is below 2^26 but the lowest (below 2^26 + 5 * a small carry).
    for (int round = 0; round < 3; round++) {
        u64 c = 0;
        for (int i = 0; i < 5; i++) {
            d[i] += c;
            c = d[i] >> 26;
            d[i] &= TZ_M26;
        }
        d[0] += c * 5;
    }
    // Two more: the first may carry out of the top once more (then all higher limbs become
    // zero), after the second every limb is below 2^26, so the value is below 2^130.
    u32 h[5];
    for (int i = 0; i < 5; i++) h[i] = (u32)d[i];
    for (int round = 0; round < 2; round++) {
        u32 c = 0;
        for (int i = 0; i < 5; i++) {
            h[i] += c;
            c = h[i] >> 26;
            h[i] &= TZ_M26;
        }
        h[0] += c * 5;
    }
    // g = h + 5 - 2^130 = h - p; the carry out of g's top limb says h >= p. No branch on it.
    u32 g[5];
    u32 c = 5;
    for (int i = 0; i < 5; i++) {
        u32 t = h[i] + c;
        g[i] = t & TZ_M26;
        c = t >> 26;
    }
    u32 mask = 0u - c;
    for (int i = 0; i < 5; i++) out[i] = (h[i] & ~mask) | (g[i] & mask);
}

// The message block `i` of a chunk of `len` bytes at `p` (16-byte aligned when `aligned`), with
// the 2^128 bit, or for a short last block the 0x01 byte after it.
TZ_DEV void tz_load_block(const u8* p, u64 len, u64 i, bool aligned, u32 n[5]) {
    u32 w[4];
    u64 off = i * 16;
    u32 hibit = 1u << 24;
    if (off + 16 <= len) {
        if (aligned) {
            uint4 v = tz_ld16(p + off);
            w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
        } else {
            for (int j = 0; j < 4; j++) w[j] = tz_le32(p + off + 4 * j);
        }
    } else {
        u8 b[16];
        u32 k = (u32)(len - off);
        for (u32 j = 0; j < 16; j++) b[j] = j < k ? p[off + j] : (j == k ? 1 : 0);
        for (int j = 0; j < 4; j++) w[j] = tz_le32(b + 4 * j);
        hibit = 0;
    }
    n[0] = w[0] & TZ_M26;
    n[1] = ((w[0] >> 26) | (w[1] << 6)) & TZ_M26;
    n[2] = ((w[1] >> 20) | (w[2] << 12)) & TZ_M26;
    n[3] = ((w[2] >> 14) | (w[3] << 18)) & TZ_M26;
    n[4] = (w[3] >> 8) | hibit;
}

TZ_DEV void tz_limbs_from_le16(const u8* b, u32 n[5]) {
    u32 w[4];
    for (int j = 0; j < 4; j++) w[j] = tz_le32(b + 4 * j);
    n[0] = w[0] & TZ_M26;
    n[1] = ((w[0] >> 26) | (w[1] << 6)) & TZ_M26;
    n[2] = ((w[1] >> 20) | (w[2] << 12)) & TZ_M26;
    n[3] = ((w[2] >> 14) | (w[3] << 18)) & TZ_M26;
    n[4] = w[3] >> 8;
}

// ------------------------------------------------------------------------------------ tiles

// Verify tiles of a chunk: TB = TZ_VT * TZ_VM Poly1305 blocks each, at least one (an empty
// chunk's tag is s alone).
TZ_DEV u64 tz_verify_tiles(u64 len) {
    u64 nb = (len + 15) / 16;
    u64 t = (nb + (u64)TZ_VT * TZ_VM - 1) / ((u64)TZ_VT * TZ_VM);
    return t ? t : 1;
}

// Decrypt tiles: TZ_DT * TZ_DK keystream blocks each; data byte j uses keystream byte j + 32.
TZ_DEV u64 tz_decrypt_tiles(u64 len) {
    if (len == 0) return 0;
    u64 nks = (len + 32 + 63) / 64;
    return (nks + (u64)TZ_DT * TZ_DK - 1) / ((u64)TZ_DT * TZ_DK);
}

// Which chunk global tile `g` belongs to, and its tile index within the chunk; false past the end.
TZ_DEV bool tz_find_tile(const tz_open_args* a, u64 g, bool verify, u32* chunk, u64* tile) {
    for (u32 c = 0; c < a->nchunks && c < TZ_MAX_CHUNKS; c++) {
        u64 n = verify ? tz_verify_tiles(a->chunks[c].len) : tz_decrypt_tiles(a->chunks[c].len);
        if (g < n) {
            *chunk = c;
            *tile = g;
            return true;
        }
        g -= n;
    }
    return false;
}

TZ_DEV u64 tz_total_tiles(const tz_open_args* a, bool verify) {
    u64 t = 0;
    for (u32 c = 0; c < a->nchunks && c < TZ_MAX_CHUNKS; c++)
        t += verify ? tz_verify_tiles(a->chunks[c].len) : tz_decrypt_tiles(a->chunks[c].len);
    return t;
}

// ------------------------------------------------------------------------------------ verify

struct tz_verify_shared {
    u32 r[5];
    u32 s[4];
    u32 pw[TZ_VLEVELS + 1][5];  // r^(VM * 2^k)
    u32 scale[5];               // r^(TB * tiles after this one)
    u32 part[TZ_VT][5];
    u32 valid;                  // the chunk's slot is in range
};

// Thread 0: the Poly1305 key of the chunk (first 32 bytes of its keystream).
TZ_DEV void tz_verify_setup(const tz_open_args* a, tz_verify_shared* sh, u32 c) {
    const tz_chunk* ch = &a->chunks[c];
    u32 sub[8], b0[16];
    tz_hsalsa20(a->key, ch->nonce, sub);
    tz_salsa20_block(sub, ch->nonce, 0, b0);
    // r = block0[0..16] clamped, s = block0[16..32]
    u32 t0 = b0[0], t1 = b0[1], t2 = b0[2], t3 = b0[3];
    sh->r[0] = t0 & 0x3ffffffu;
    sh->r[1] = ((t0 >> 26) | (t1 << 6)) & 0x3ffff03u;
    sh->r[2] = ((t1 >> 20) | (t2 << 12)) & 0x3ffc0ffu;
    sh->r[3] = ((t2 >> 14) | (t3 << 18)) & 0x3f03fffu;
    sh->r[4] = (t3 >> 8) & 0x00fffffu;
    for (int i = 0; i < 4; i++) sh->s[i] = b0[4 + i];
    for (int i = 0; i < 8; i++) sub[i] = 0;
    for (int i = 0; i < 16; i++) b0[i] = 0;
    sh->valid = ch->slot < a->nslots;
}

// One thread: the powers the tree and the cross-tile scaling need.
TZ_DEV void tz_verify_powers(const tz_open_args* a, tz_verify_shared* sh, u32 c, u64 tile) {
    u32 x[5];
    tz_pcopy(x, sh->r);
    for (int i = 0; i < 4; i++) tz_pmul(x, x, x);  // r^16 = r^VM
    static_assert(TZ_VM == 16, "r^VM is four squarings");
    tz_pcopy(sh->pw[0], x);
    for (int k = 1; k <= TZ_VLEVELS; k++) tz_pmul(sh->pw[k], sh->pw[k - 1], sh->pw[k - 1]);
    // scale = (r^TB)^e, e = tiles after this one
    u64 e = tz_verify_tiles(a->chunks[c].len) - 1 - tile;
    u32 acc[5] = {1, 0, 0, 0, 0};
    tz_pcopy(x, sh->pw[TZ_VLEVELS]);
    while (e) {
        if (e & 1) tz_pmul(acc, acc, x);
        e >>= 1;
        if (e) tz_pmul(x, x, x);
    }
    tz_pcopy(sh->scale, acc);
}

// Each thread: Horner over its TZ_VM virtual blocks.
TZ_DEV void tz_verify_horner(const tz_open_args* a, tz_verify_shared* sh, u32 c, u64 tile, u32 tid) {
    const tz_chunk* ch = &a->chunks[c];
    const u8* p = (const u8*)ch->data;
    u64 nb = (ch->len + 15) / 16;
    u64 pad = tz_verify_tiles(ch->len) * (u64)TZ_VT * TZ_VM - nb;
    u64 v0 = tile * (u64)TZ_VT * TZ_VM + (u64)tid * TZ_VM;
    bool aligned = (ch->data & 15) == 0;
    u32 r[5];
    tz_pcopy(r, sh->r);
    u32 h[5] = {0, 0, 0, 0, 0};
    for (u32 j = 0; j < TZ_VM; j++) {
        u64 v = v0 + j;
        if (v < pad) continue;  // the zero pad: contributes nothing
        u32 n[5];
        tz_load_block(p, ch->len, v - pad, aligned, n);
        tz_padd(h, h, n);
        tz_pmul(h, h, r);
    }
    tz_pcopy(sh->part[tid], h);
}

// Tree level k: part[tid] = part[tid] * r^(VM 2^k) + part[tid + 2^k] for tid a multiple of 2^(k+1).
TZ_DEV void tz_verify_combine(tz_verify_shared* sh, u32 tid, int k) {
    u32 stride = 1u << k;
    if ((tid & (2 * stride - 1)) != 0) return;
    u32 t[5];
    tz_pmul(t, sh->part[tid], sh->pw[k]);
    tz_padd(sh->part[tid], t, sh->part[tid + stride]);
}

// Thread 0, after the tree: this tile's share, scaled, into the chunk's slot. Returns whether
// this tile arrived last (then tz_verify_finish runs).
TZ_DEV void tz_atomic_add(u64* p, u64 v) {
#ifdef TZ_HOST_EMULATION
    *p += v;
#else
    atomicAdd(p, v);
#endif
}

TZ_DEV bool tz_verify_contribute(const tz_open_args* a, tz_verify_shared* sh, u32 c) {
    if (!sh->valid) return false;
    tz_slot* slot = (tz_slot*)a->slots + a->chunks[c].slot;
    u32 q[5];
    tz_pmul(q, sh->part[0], sh->scale);
    u64 wide[5];
    for (int i = 0; i < 5; i++) wide[i] = q[i];
    u32 frozen[5];
    tz_freeze(frozen, wide);
    for (int i = 0; i < 5; i++) tz_atomic_add(&slot->acc[i], frozen[i]);
#ifdef TZ_HOST_EMULATION
    u32 before = slot->arrived++;
#else
    __threadfence();
    u32 before = atomicAdd(&slot->arrived, 1u);
#endif
    return (u64)before + 1 == tz_verify_tiles(a->chunks[c].len);
}

// The last tile of a chunk: reduce the sum, add s, compare with the MAC in constant time,
// write the verdict and reset the scratch for the slot's next use.
TZ_DEV void tz_verify_finish(const tz_open_args* a, tz_verify_shared* sh, u32 c) {
    tz_slot* slot = (tz_slot*)a->slots + a->chunks[c].slot;
    u64 sum[5];
#ifdef TZ_HOST_EMULATION
    for (int i = 0; i < 5; i++) {
        sum[i] = slot->acc[i];
        slot->acc[i] = 0;
    }
    slot->arrived = 0;
#else
    __threadfence();
    for (int i = 0; i < 5; i++) sum[i] = atomicExch(&slot->acc[i], 0ull);
    atomicExch(&slot->arrived, 0u);
#endif
    u32 h[5];
    tz_freeze(h, sum);
    // h mod 2^128 as four words, plus s
    u32 w0 = h[0] | (h[1] << 26);
    u32 w1 = (h[1] >> 6) | (h[2] << 20);
    u32 w2 = (h[2] >> 12) | (h[3] << 14);
    u32 w3 = (h[3] >> 18) | (h[4] << 8);
    u64 f = (u64)w0 + sh->s[0];
    u32 t0 = (u32)f;
    f = (u64)w1 + sh->s[1] + (f >> 32);
    u32 t1 = (u32)f;
    f = (u64)w2 + sh->s[2] + (f >> 32);
    u32 t2 = (u32)f;
    f = (u64)w3 + sh->s[3] + (f >> 32);
    u32 t3 = (u32)f;
    const u8* m = a->chunks[c].mac;
    u32 diff = (t0 ^ tz_le32(m)) | (t1 ^ tz_le32(m + 4)) | (t2 ^ tz_le32(m + 8)) | (t3 ^ tz_le32(m + 12));
    slot->verdict = diff == 0 ? TZ_AUTHENTIC : TZ_FORGED;
}

// ------------------------------------------------------------------------------------ decrypt

struct tz_decrypt_shared {
    u32 sub[8];
    u32 go;  // the chunk's verdict is TZ_AUTHENTIC
};

TZ_DEV void tz_decrypt_setup(const tz_open_args* a, tz_decrypt_shared* sh, u32 c) {
    const tz_chunk* ch = &a->chunks[c];
    bool ok = ch->slot < a->nslots;
    if (ok) {
        volatile tz_slot* slot = (volatile tz_slot*)a->slots + ch->slot;
        ok = slot->verdict == TZ_AUTHENTIC;
    }
    sh->go = ok;
    if (ok) tz_hsalsa20(a->key, ch->nonce, sh->sub);
}

// Each thread: keystream blocks tile * DT * DK + q * DT + tid (q < DK), each XORed onto data
// bytes [64k - 32, 64k + 32) (block 0: its second half onto bytes 0..32).
TZ_DEV void tz_decrypt_thread(const tz_open_args* a, const tz_decrypt_shared* sh, u32 c, u64 tile, u32 tid) {
    if (!sh->go) return;
    const tz_chunk* ch = &a->chunks[c];
    u8* p = (u8*)ch->data;
    u64 len = ch->len;
    u64 nks = (len + 32 + 63) / 64;
    bool aligned = (ch->data & 15) == 0;
    for (u32 q = 0; q < TZ_DK; q++) {
        u64 k = tile * (u64)TZ_DT * TZ_DK + (u64)q * TZ_DT + tid;
        if (k >= nks) break;
        u32 ks[16];
        tz_salsa20_block(sh->sub, ch->nonce, k, ks);
        // keystream byte 64k + i pairs with data byte 64k + i - 32
        u64 start = k == 0 ? 0 : 64 * k - 32;
        u32 first = k == 0 ? 32 : 0;  // first keystream byte used
        u64 end = 64 * k + 32 < len ? 64 * k + 32 : len;
        if (aligned && k > 0 && end - start == 64) {
            for (int j = 0; j < 4; j++) {
                uint4 v = tz_ld16(p + start + 16 * j);
                v.x ^= ks[4 * j]; v.y ^= ks[4 * j + 1]; v.z ^= ks[4 * j + 2]; v.w ^= ks[4 * j + 3];
                tz_st16(p + start + 16 * j, v);
            }
            continue;
        }
        // Byte by byte (the edges of a chunk, unaligned data), unrolled so that `ks` is indexed
        // with constants and stays in registers.
#ifndef TZ_HOST_EMULATION
#pragma unroll
#endif
        for (u32 i = 0; i < 64; i++) {
            u64 b = start + i - first;
            if (i >= first && b < end) p[b] ^= (u8)(ks[i >> 2] >> (8 * (i & 3)));
        }
    }
}

// ------------------------------------------------------------------------------------ kernels

#ifndef TZ_HOST_EMULATION
// Thread 0 finds each tile's chunk (a walk over at most 32 chunks) and shares it.
struct tz_tile_shared {
    u64 total;
    u64 tile;
    u32 chunk;
};

extern "C" __global__ void __launch_bounds__(TZ_VT) tz_secretbox_verify(__grid_constant__ const tz_open_args a) {
    __shared__ tz_verify_shared sh;
    __shared__ tz_tile_shared at;
    if (threadIdx.x == 0) at.total = tz_total_tiles(&a, true);
    __syncthreads();
    u64 total = at.total;
    for (u64 g = blockIdx.x; g < total; g += gridDim.x) {
        if (threadIdx.x == 0) {
            u32 c = 0;
            u64 tile = 0;
            tz_find_tile(&a, g, true, &c, &tile);
            at.chunk = c;
            at.tile = tile;
            tz_verify_setup(&a, &sh, c);
        }
        __syncthreads();
        u32 c = at.chunk;
        u64 tile = at.tile;
        tz_verify_horner(&a, &sh, c, tile, threadIdx.x);
        if (threadIdx.x == 32) tz_verify_powers(&a, &sh, c, tile);  // warp 1, beside its Horner
        __syncthreads();
        for (int k = 0; k < TZ_VLEVELS; k++) {
            tz_verify_combine(&sh, threadIdx.x, k);
            __syncthreads();
        }
        if (threadIdx.x == 0 && tz_verify_contribute(&a, &sh, c)) tz_verify_finish(&a, &sh, c);
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(TZ_DT) tz_secretbox_decrypt(__grid_constant__ const tz_open_args a) {
    __shared__ tz_decrypt_shared sh;
    __shared__ tz_tile_shared at;
    if (threadIdx.x == 0) at.total = tz_total_tiles(&a, false);
    __syncthreads();
    u64 total = at.total;
    for (u64 g = blockIdx.x; g < total; g += gridDim.x) {
        if (threadIdx.x == 0) {
            u32 c = 0;
            u64 tile = 0;
            tz_find_tile(&a, g, false, &c, &tile);
            at.chunk = c;
            at.tile = tile;
            tz_decrypt_setup(&a, &sh, c);
        }
        __syncthreads();
        tz_decrypt_thread(&a, &sh, at.chunk, at.tile, threadIdx.x);
        __syncthreads();
    }
}
#else
// The two kernels run on the host, every block and thread in turn, phase by phase (each
// __syncthreads above is a phase boundary here). `grid` plays gridDim.x.
extern "C" void tz_host_open(const tz_open_args* a, u32 grid) {
    tz_verify_shared sh;
    u64 total = tz_total_tiles(a, true);
    for (u32 b = 0; b < grid; b++) {
        for (u64 g = b; g < total; g += grid) {
            u32 c = 0;
            u64 tile = 0;
            tz_find_tile(a, g, true, &c, &tile);
            tz_verify_setup(a, &sh, c);
            for (u32 t = 0; t < TZ_VT; t++) tz_verify_horner(a, &sh, c, tile, t);
            tz_verify_powers(a, &sh, c, tile);
            for (int k = 0; k < TZ_VLEVELS; k++)
                for (u32 t = 0; t < TZ_VT; t++) tz_verify_combine(&sh, t, k);
            if (tz_verify_contribute(a, &sh, c)) tz_verify_finish(a, &sh, c);
        }
    }
    tz_decrypt_shared dsh;
    total = tz_total_tiles(a, false);
    for (u32 b = 0; b < grid; b++) {
        for (u64 g = b; g < total; g += grid) {
            u32 c = 0;
            u64 tile = 0;
            tz_find_tile(a, g, false, &c, &tile);
            tz_decrypt_setup(a, &dsh, c);
            for (u32 t = 0; t < TZ_DT; t++) tz_decrypt_thread(a, &dsh, c, tile, t);
        }
    }
}
#endif
