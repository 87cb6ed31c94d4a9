//! Salsa20/20 and HSalsa20 (the XSalsa20 pieces of `crypto_secretbox`), with the keystream
//! computed 8 blocks at a time in AVX2 (or AVX-512VL) registers where the CPU has them, and a
//! portable scalar path everywhere else. Checked against the `salsa20` crate in the tests.

const SIGMA: [u32; 4] = [0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574];

/// The operations a round needs, on one 32-bit word or on a vector of them.
trait Word: Copy {
    fn add(self, o: Self) -> Self;
    fn xor(self, o: Self) -> Self;
    /// Rotate left by `L` (`R` = 32 - `L`, for shift-based implementations).
    fn rotl<const L: i32, const R: i32>(self) -> Self;
}

impl Word for u32 {
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        self.wrapping_add(o)
    }
    #[inline(always)]
    fn xor(self, o: Self) -> Self {
        self ^ o
    }
    #[inline(always)]
    fn rotl<const L: i32, const R: i32>(self) -> Self {
        self.rotate_left(L as u32)
    }
}

#[inline(always)]
fn quarter<W: Word>(x: &mut [W; 16], a: usize, b: usize, c: usize, d: usize) {
    x[b] = x[b].xor(x[a].add(x[d]).rotl::<7, 25>());
    x[c] = x[c].xor(x[b].add(x[a]).rotl::<9, 23>());
    x[d] = x[d].xor(x[c].add(x[b]).rotl::<13, 19>());
    x[a] = x[a].xor(x[d].add(x[c]).rotl::<18, 14>());
}

/// The 20 rounds (10 column + row double rounds), without the final feed-forward.
#[inline(always)]
fn rounds<W: Word>(x: &mut [W; 16]) {
    for _ in 0..10 {
        quarter(x, 0, 4, 8, 12);
        quarter(x, 5, 9, 13, 1);
        quarter(x, 10, 14, 2, 6);
        quarter(x, 15, 3, 7, 11);
        quarter(x, 0, 1, 2, 3);
        quarter(x, 5, 6, 7, 4);
        quarter(x, 10, 11, 8, 9);
        quarter(x, 15, 12, 13, 14);
    }
}

fn le_words<const N: usize>(b: &[u8]) -> [u32; N] {
    let mut w = [0u32; N];
    for (i, c) in b.chunks_exact(4).take(N).enumerate() {
        w[i] = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    w
}

/// HSalsa20: derive XSalsa20's subkey from the key and the first 16 nonce bytes.
pub fn hsalsa20(key: &[u8; 32], input: &[u8; 16]) -> [u8; 32] {
    let k: [u32; 8] = le_words(key);
    let n: [u32; 4] = le_words(input);
    let mut x = [
        SIGMA[0], k[0], k[1], k[2], k[3], SIGMA[1], n[0], n[1], n[2], n[3], SIGMA[2], k[4], k[5], k[6], k[7], SIGMA[3],
    ];
    rounds(&mut x);
    let mut out = [0u8; 32];
    for (i, w) in [x[0], x[5], x[10], x[15], x[6], x[7], x[8], x[9]].iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// A Salsa20/20 keystream for one 32-byte key and 8-byte nonce.
#[derive(Clone)]
pub struct Salsa20 {
    /// The input block with the counter words (8, 9) left at zero.
    input: [u32; 16],
}

impl Drop for Salsa20 {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.input);
    }
}

impl Salsa20 {
    pub fn new(key: &[u8; 32], nonce: &[u8; 8]) -> Self {
        let k: [u32; 8] = le_words(key);
        let n: [u32; 2] = le_words(nonce);
        Salsa20 {
            input: [
                SIGMA[0], k[0], k[1], k[2], k[3], SIGMA[1], n[0], n[1], 0, 0, SIGMA[2], k[4], k[5], k[6], k[7],
                SIGMA[3],
            ],
        }
    }

    /// Keystream block number `counter`.
    pub fn block(&self, counter: u64) -> [u8; 64] {
        let mut input = self.input;
        input[8] = counter as u32;
        input[9] = (counter >> 32) as u32;
        let mut x = input;
        rounds(&mut x);
        let mut out = [0u8; 64];
        for i in 0..16 {
            out[4 * i..4 * i + 4].copy_from_slice(&x[i].wrapping_add(input[i]).to_le_bytes());
        }
        out
    }

    /// XOR `data` with the keystream starting at the beginning of block `counter` (the block
    /// counter wraps mod 2^64 like libsodium's).
    pub fn xor_at(&self, counter: u64, data: &mut [u8]) {
        self.xor_with(backend(), counter, data)
    }

    #[doc(hidden)]
    pub fn xor_with(&self, backend: Backend, mut counter: u64, data: &mut [u8]) {
        let done = match backend {
            Backend::Portable => 0,
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `backend()` only reports these when the CPU has the features.
            Backend::Avx2 => unsafe { x86::xor_avx2(&self.input, counter, data) },
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512Vl => unsafe { x86::xor_avx512vl(&self.input, counter, data) },
        };
        counter = counter.wrapping_add((done / 64) as u64);
        for chunk in data[done..].chunks_mut(64) {
            let ks = self.block(counter);
            for (d, k) in chunk.iter_mut().zip(ks.iter()) {
                *d ^= k;
            }
            counter = counter.wrapping_add(1);
        }
    }
}

/// Which keystream implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vl,
}

/// The fastest implementation this CPU supports.
pub fn backend() -> Backend {
    use std::sync::OnceLock;
    static BACKEND: OnceLock<Backend> = OnceLock::new();
    *BACKEND.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if x86::avx512vl_usable() {
                return Backend::Avx512Vl;
            }
            if std::is_x86_feature_detected!("avx2") {
                return Backend::Avx2;
            }
        }
        Backend::Portable
    })
}

/// Every backend this CPU can run (for tests and benchmarks).
pub fn available_backends() -> Vec<Backend> {
    let mut v = vec![Backend::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            v.push(Backend::Avx2);
        }
        if x86::avx512vl_usable() {
            v.push(Backend::Avx512Vl);
        }
    }
    v
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{rounds, Word};

    /// Eight words, one per block, rotated with two shifts (AVX2).
    #[derive(Clone, Copy)]
    struct Avx2(__m256i);
    /// Eight words rotated with `vprold` (AVX-512VL), which also gives 32 vector registers.
    #[derive(Clone, Copy)]
    #[allow(dead_code)] // unused before Rust 1.89
    struct Avx512Vl(__m256i);

    // The methods are only ever inlined into the `#[target_feature]` functions below.
    impl Word for Avx2 {
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { Avx2(_mm256_add_epi32(self.0, o.0)) }
        }
        #[inline(always)]
        fn xor(self, o: Self) -> Self {
            unsafe { Avx2(_mm256_xor_si256(self.0, o.0)) }
        }
        #[inline(always)]
        fn rotl<const L: i32, const R: i32>(self) -> Self {
            unsafe { Avx2(_mm256_or_si256(_mm256_slli_epi32::<L>(self.0), _mm256_srli_epi32::<R>(self.0))) }
        }
    }

    // AVX-512 intrinsics and `target_feature`s are stable from Rust 1.89; older compilers (the
    // crate's MSRV is 1.85) build only the AVX2 and portable paths.
    #[rustversion::since(1.89)]
    #[allow(clippy::incompatible_msrv)]
    impl Word for Avx512Vl {
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { Avx512Vl(_mm256_add_epi32(self.0, o.0)) }
        }
        #[inline(always)]
        fn xor(self, o: Self) -> Self {
            unsafe { Avx512Vl(_mm256_xor_si256(self.0, o.0)) }
        }
        #[inline(always)]
        fn rotl<const L: i32, const R: i32>(self) -> Self {
            unsafe { Avx512Vl(_mm256_rol_epi32::<L>(self.0)) }
        }
    }

    trait Vec8: Word {
        fn from(v: __m256i) -> Self;
        fn get(self) -> __m256i;
    }
    impl Vec8 for Avx2 {
        #[inline(always)]
        fn from(v: __m256i) -> Self {
            Avx2(v)
        }
        #[inline(always)]
        fn get(self) -> __m256i {
            self.0
        }
    }
    #[rustversion::since(1.89)]
    impl Vec8 for Avx512Vl {
        #[inline(always)]
        fn from(v: __m256i) -> Self {
            Avx512Vl(v)
        }
        #[inline(always)]
        fn get(self) -> __m256i {
            self.0
        }
    }

    /// Transpose 8 vectors of 8 words: `r[w]` holds word `w` of blocks 0..8; the result's
    /// vector `b` holds words 0..8 of block `b`.
    #[inline(always)]
    unsafe fn transpose8(r: [__m256i; 8]) -> [__m256i; 8] {
        let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
        let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
        let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
        let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
        let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
        let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
        let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
        let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
        let u0 = _mm256_unpacklo_epi64(t0, t2);
        let u1 = _mm256_unpackhi_epi64(t0, t2);
        let u2 = _mm256_unpacklo_epi64(t1, t3);
        let u3 = _mm256_unpackhi_epi64(t1, t3);
        let u4 = _mm256_unpacklo_epi64(t4, t6);
        let u5 = _mm256_unpackhi_epi64(t4, t6);
        let u6 = _mm256_unpacklo_epi64(t5, t7);
        let u7 = _mm256_unpackhi_epi64(t5, t7);
        [
            _mm256_permute2x128_si256::<0x20>(u0, u4),
            _mm256_permute2x128_si256::<0x20>(u1, u5),
            _mm256_permute2x128_si256::<0x20>(u2, u6),
            _mm256_permute2x128_si256::<0x20>(u3, u7),
            _mm256_permute2x128_si256::<0x31>(u0, u4),
            _mm256_permute2x128_si256::<0x31>(u1, u5),
            _mm256_permute2x128_si256::<0x31>(u2, u6),
            _mm256_permute2x128_si256::<0x31>(u3, u7),
        ]
    }

    /// XOR whole 512-byte groups (8 blocks) of `data` with the keystream from block `counter`;
    /// returns how many bytes were done.
    #[inline(always)]
    unsafe fn xor_groups<V: Vec8>(input: &[u32; 16], mut counter: u64, data: &mut [u8]) -> usize {
        let groups = data.len() / 512;
        let mut base = [_mm256_setzero_si256(); 16];
        for (i, b) in base.iter_mut().enumerate() {
            *b = _mm256_set1_epi32(input[i] as i32);
        }
        for g in 0..groups {
            let mut lo = [0u32; 8];
            let mut hi = [0u32; 8];
            for l in 0..8 {
                let c = counter.wrapping_add(l as u64);
                lo[l] = c as u32;
                hi[l] = (c >> 32) as u32;
            }
            let mut start = base;
            start[8] = _mm256_loadu_si256(lo.as_ptr().cast());
            start[9] = _mm256_loadu_si256(hi.as_ptr().cast());
            let mut x: [V; 16] = [V::from(_mm256_setzero_si256()); 16];
            for i in 0..16 {
                x[i] = V::from(start[i]);
            }
            rounds(&mut x);
            let mut w = [_mm256_setzero_si256(); 16];
            for i in 0..16 {
                w[i] = _mm256_add_epi32(x[i].get(), start[i]);
            }
            let first = transpose8([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            let second = transpose8([w[8], w[9], w[10], w[11], w[12], w[13], w[14], w[15]]);
            let p = data.as_mut_ptr().add(g * 512);
            for b in 0..8 {
                let q = p.add(64 * b).cast::<__m256i>();
                _mm256_storeu_si256(q, _mm256_xor_si256(_mm256_loadu_si256(q), first[b]));
                let q = q.add(1);
                _mm256_storeu_si256(q, _mm256_xor_si256(_mm256_loadu_si256(q), second[b]));
            }
            counter = counter.wrapping_add(8);
        }
        groups * 512
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn xor_avx2(input: &[u32; 16], counter: u64, data: &mut [u8]) -> usize {
        xor_groups::<Avx2>(input, counter, data)
    }

    #[rustversion::since(1.89)]
    #[allow(clippy::incompatible_msrv)]
    #[target_feature(enable = "avx2,avx512f,avx512vl")]
    pub unsafe fn xor_avx512vl(input: &[u32; 16], counter: u64, data: &mut [u8]) -> usize {
        xor_groups::<Avx512Vl>(input, counter, data)
    }

    /// Never called: [`avx512vl_usable`] is false on these compilers.
    #[rustversion::before(1.89)]
    pub unsafe fn xor_avx512vl(_input: &[u32; 16], _counter: u64, _data: &mut [u8]) -> usize {
        0
    }

    #[rustversion::since(1.89)]
    pub fn avx512vl_usable() -> bool {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl")
    }

    #[rustversion::before(1.89)]
    pub fn avx512vl_usable() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use salsa20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};

    fn reference(key: &[u8; 32], nonce: &[u8; 8], counter: u64, data: &mut [u8]) {
        let mut c = salsa20::Salsa20::new(key.into(), nonce.into());
        c.seek(counter as u128 * 64);
        c.apply_keystream(data);
    }

    #[test]
    fn hsalsa20_matches_the_salsa20_crate() {
        let key: [u8; 32] = std::array::from_fn(|i| (i * 13 + 1) as u8);
        let input: [u8; 16] = std::array::from_fn(|i| (i * 7 + 3) as u8);
        let ours = hsalsa20(&key, &input);
        let theirs = salsa20::hsalsa::<salsa20::cipher::consts::U10>(&key.into(), &input.into());
        assert_eq!(&ours[..], theirs.as_slice());
    }

    #[test]
    fn every_backend_matches_the_salsa20_crate() {
        let key: [u8; 32] = std::array::from_fn(|i| (i * 29 + 5) as u8);
        let nonce: [u8; 8] = std::array::from_fn(|i| (i * 3 + 200) as u8);
        let s = Salsa20::new(&key, &nonce);
        let plain: Vec<u8> = (0..5000u32).map(|i| (i ^ (i >> 3)) as u8).collect();
        // Counters near the 32-bit carry; lengths around the 512-byte group size.
        for counter in [0u64, 1, 7, (1 << 32) - 3, (1 << 32) - 9] {
            for len in [0, 1, 63, 64, 65, 511, 512, 513, 1024 + 77, 4096, 5000] {
                let mut want = plain[..len].to_vec();
                reference(&key, &nonce, counter, &mut want);
                for b in available_backends() {
                    let mut got = plain[..len].to_vec();
                    s.xor_with(b, counter, &mut got);
                    assert!(got == want, "{b:?} counter {counter} len {len}");
                }
            }
        }
        // Wrapping of the 64-bit block counter inside one 8-block group.
        for b in available_backends() {
            let mut got = plain[..1024].to_vec();
            s.xor_with(b, u64::MAX - 2, &mut got);
            let mut want = plain[..1024].to_vec();
            for (i, chunk) in want.chunks_mut(64).enumerate() {
                let ks = s.block((u64::MAX - 2).wrapping_add(i as u64));
                chunk.iter_mut().zip(ks).for_each(|(d, k)| *d ^= k);
            }
            assert!(got == want, "{b:?} wrap");
        }
    }
}
