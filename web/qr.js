// A QR code of a room's link, drawn in the page: the link then goes to a phone through its
// camera, not through another app that would see the secret. ISO/IEC 18004 in the one shape
// this needs: byte mode, error correction level M, versions 1–10 (up to 213 bytes, enough for
// a link on any host name, a v3 .onion included). Loaded only when asked for.

/** Per version (index), level M: [EC codewords per block, blocks of group 1, their data
 * codewords, blocks of group 2, their data codewords]. */
const BLOCKS = [
  null,
  [10, 1, 16, 0, 0],
  [16, 1, 28, 0, 0],
  [26, 1, 44, 0, 0],
  [18, 2, 32, 0, 0],
  [24, 2, 43, 0, 0],
  [16, 4, 27, 0, 0],
  [18, 4, 31, 0, 0],
  [22, 2, 38, 2, 39],
  [22, 3, 36, 2, 37],
  [26, 4, 43, 1, 44],
];

/** Centres of the alignment patterns, per version (rows and columns alike). */
const ALIGNMENT = [
  null, [], [6, 18], [6, 22], [6, 26], [6, 30], [6, 34],
  [6, 22, 38], [6, 24, 42], [6, 26, 46], [6, 28, 50],
];

export const MAX_VERSION = 10;

// GF(256) with the polynomial x^8 + x^4 + x^3 + x^2 + 1, as tables of powers and logarithms.
const EXP = new Uint8Array(512);
const LOG = new Uint8Array(256);
for (let i = 0, x = 1; i < 255; i += 1) {
  EXP[i] = x;
  LOG[x] = i;
  x <<= 1;
  if (x & 0x100) x ^= 0x11d;
}
for (let i = 255; i < 512; i += 1) EXP[i] = EXP[i - 255];

function times(a, b) {
  return a === 0 || b === 0 ? 0 : EXP[LOG[a] + LOG[b]];
}

/** The Reed–Solomon generator of degree n: (x − α^0)…(x − α^(n−1)), highest power first. */
function generator(n) {
  let g = [1];
  for (let i = 0; i < n; i += 1) {
    const next = new Array(g.length + 1).fill(0);
    g.forEach((c, j) => {
      next[j] ^= c;
      next[j + 1] ^= times(c, EXP[i]);
    });
    g = next;
  }
  return g;
}

/** The n error correction codewords of a block: the remainder of data · x^n by the generator. */
export function correction(data, n) {
  const g = generator(n);
  const rest = new Array(n).fill(0);
  for (const byte of data) {
    const factor = byte ^ rest.shift();
    rest.push(0);
    for (let j = 0; j < n; j += 1) rest[j] ^= times(g[j + 1], factor);
  }
  return rest;
}

function capacity(version) {
  const [, b1, d1, b2, d2] = BLOCKS[version];
  return b1 * d1 + b2 * d2;
}

/** The smallest version whose data codewords hold these bytes in byte mode, or 0. */
export function versionFor(length) {
  for (let v = 1; v <= MAX_VERSION; v += 1) {
    if (4 + (v < 10 ? 8 : 16) + 8 * length <= 8 * capacity(v)) return v;
  }
  return 0;
}

/** The data codewords: mode, count, the bytes, terminator, then the pad bytes. */
export function dataCodewords(bytes, version) {
  const room = capacity(version);
  const bits = [];
  const put = (value, length) => {
    for (let i = length - 1; i >= 0; i -= 1) bits.push((value >>> i) & 1);
  };
  put(0b0100, 4);
  put(bytes.length, version < 10 ? 8 : 16);
  for (const b of bytes) put(b, 8);
  put(0, Math.min(4, 8 * room - bits.length));
  while (bits.length % 8 !== 0) bits.push(0);
  const out = [];
  for (let i = 0; i < bits.length; i += 8) {
    out.push(bits.slice(i, i + 8).reduce((byte, bit) => (byte << 1) | bit, 0));
  }
  for (let pad = 0xec; out.length < room; pad ^= 0xec ^ 0x11) out.push(pad);
  return out;
}

/** Every codeword in the order placed: the blocks' data interleaved, then their corrections. */
function interleaved(data, version) {
  const [ecLength, b1, d1, b2, d2] = BLOCKS[version];
  const blocks = [];
  let at = 0;
  for (let i = 0; i < b1 + b2; i += 1) {
    const part = data.slice(at, at + (i < b1 ? d1 : d2));
    at += part.length;
    blocks.push([part, correction(part, ecLength)]);
  }
  const out = [];
  for (let i = 0; i < Math.max(d1, d2); i += 1) {
    for (const [part] of blocks) if (i < part.length) out.push(part[i]);
  }
  for (let i = 0; i < ecLength; i += 1) for (const [, ec] of blocks) out.push(ec[i]);
  return out;
}

/** `value` followed by its BCH check bits: the remainder by `poly`, of degree `degree`. */
function bch(value, degree, poly) {
  let rest = value << degree;
  for (let bit = 31 - Math.clz32(rest); bit >= degree; bit -= 1) {
    if (rest & (1 << bit)) rest ^= poly << (bit - degree);
  }
  return (value << degree) | rest;
}

/** The 15 format bits for level M and a mask, as placed (masked with 101010000010010). */
export function formatInfo(mask) {
  return bch(mask, 10, 0x537) ^ 0x5412; // level M's two bits are 00
}

/** The 18 version bits (versions 7 and up). */
export function versionInfo(version) {
  return bch(version, 12, 0x1f25);
}

const MASKS = [
  (r, c) => (r + c) % 2 === 0,
  (r) => r % 2 === 0,
  (r, c) => c % 3 === 0,
  (r, c) => (r + c) % 3 === 0,
  (r, c) => (Math.floor(r / 2) + Math.floor(c / 3)) % 2 === 0,
  (r, c) => ((r * c) % 2) + ((r * c) % 3) === 0,
  (r, c) => (((r * c) % 2) + ((r * c) % 3)) % 2 === 0,
  (r, c) => (((r + c) % 2) + ((r * c) % 3)) % 2 === 0,
];

class Grid {
  constructor(version) {
    this.version = version;
    this.size = 17 + 4 * version;
    this.dark = new Uint8Array(this.size * this.size);
    this.fixed = new Uint8Array(this.size * this.size); // function patterns: never data or masked
  }

  set(r, c, dark, fixed = true) {
    if (r < 0 || c < 0 || r >= this.size || c >= this.size) return;
    this.dark[r * this.size + c] = dark ? 1 : 0;
    if (fixed) this.fixed[r * this.size + c] = 1;
  }

  at(r, c) {
    return this.dark[r * this.size + c] === 1;
  }

  functionPatterns() {
    const n = this.size;
    // Finders with their light separators, in three corners.
    for (const [top, left] of [[0, 0], [0, n - 7], [n - 7, 0]]) {
      for (let dr = -1; dr <= 7; dr += 1) {
        for (let dc = -1; dc <= 7; dc += 1) {
          const ring = Math.max(Math.abs(dr - 3), Math.abs(dc - 3));
          this.set(top + dr, left + dc, ring !== 2 && ring !== 4);
        }
      }
    }
    for (let i = 8; i < n - 8; i += 1) {
      this.set(6, i, i % 2 === 0);
      this.set(i, 6, i % 2 === 0);
    }
    const centres = ALIGNMENT[this.version];
    const last = centres.at(-1);
    for (const r of centres) {
      for (const c of centres) {
        if ((r === 6 && c === 6) || (r === 6 && c === last) || (r === last && c === 6)) continue;
        for (let dr = -2; dr <= 2; dr += 1) {
          for (let dc = -2; dc <= 2; dc += 1) {
            this.set(r + dr, c + dc, Math.max(Math.abs(dr), Math.abs(dc)) !== 1);
          }
        }
      }
    }
    if (this.version >= 7) {
      const info = versionInfo(this.version);
      for (let i = 0; i < 18; i += 1) {
        const dark = ((info >>> i) & 1) === 1;
        const a = Math.floor(i / 3);
        const b = n - 11 + (i % 3);
        this.set(a, b, dark);
        this.set(b, a, dark);
      }
    }
    this.format(0); // reserves the format areas; drawn again with the chosen mask
  }

  /** The format information (level M, this mask) in both of its places, and the dark module. */
  format(mask) {
    const n = this.size;
    const info = formatInfo(mask);
    const bit = (i) => ((info >>> i) & 1) === 1;
    for (let i = 0; i <= 5; i += 1) this.set(i, 8, bit(i));
    this.set(7, 8, bit(6));
    this.set(8, 8, bit(7));
    this.set(8, 7, bit(8));
    for (let i = 9; i < 15; i += 1) this.set(8, 14 - i, bit(i));
    for (let i = 0; i < 8; i += 1) this.set(8, n - 1 - i, bit(i));
    for (let i = 8; i < 15; i += 1) this.set(n - 15 + i, 8, bit(i));
    this.set(n - 8, 8, true);
  }

  /** The codewords' bits, two columns at a time from the right, up then down. */
  place(codewords) {
    const n = this.size;
    let i = 0;
    const total = codewords.length * 8;
    for (let right = n - 1; right >= 1; right -= 2) {
      if (right === 6) right = 5; // the vertical timing pattern's column holds no data
      const upward = ((right + 1) & 2) === 0;
      for (let step = 0; step < n; step += 1) {
        const r = upward ? n - 1 - step : step;
        for (const c of [right, right - 1]) {
          if (this.fixed[r * n + c]) continue;
          const dark = i < total && ((codewords[i >>> 3] >>> (7 - (i & 7))) & 1) === 1;
          this.set(r, c, dark, false);
          i += 1;
        }
      }
    }
  }

  masked(mask) {
    const copy = new Grid(this.version);
    copy.dark.set(this.dark);
    copy.fixed.set(this.fixed);
    const n = this.size;
    for (let r = 0; r < n; r += 1) {
      for (let c = 0; c < n; c += 1) {
        if (!copy.fixed[r * n + c] && MASKS[mask](r, c)) copy.dark[r * n + c] ^= 1;
      }
    }
    copy.format(mask);
    return copy;
  }

  /** The standard's penalty: long runs, 2×2 blocks, finder-like patterns, imbalance. */
  penalty() {
    const n = this.size;
    let score = 0;
    const lines = [];
    for (let a = 0; a < n; a += 1) {
      lines.push(Array.from({ length: n }, (_, b) => this.at(a, b)));
      lines.push(Array.from({ length: n }, (_, b) => this.at(b, a)));
    }
    const finderLike = [true, false, true, true, true, false, true];
    for (const line of lines) {
      let run = 1;
      for (let i = 1; i <= n; i += 1) {
        if (i < n && line[i] === line[i - 1]) {
          run += 1;
        } else {
          if (run >= 5) score += run - 2;
          run = 1;
        }
      }
      for (let i = 0; i + 7 <= n; i += 1) {
        if (!finderLike.every((d, k) => line[i + k] === d)) continue;
        const lightBefore = [1, 2, 3, 4].every((k) => i - k < 0 || !line[i - k]);
        const lightAfter = [0, 1, 2, 3].every((k) => i + 7 + k >= n || !line[i + 7 + k]);
        if (lightBefore || lightAfter) score += 40;
      }
    }
    for (let r = 0; r + 1 < n; r += 1) {
      for (let c = 0; c + 1 < n; c += 1) {
        const d = this.at(r, c);
        if (this.at(r, c + 1) === d && this.at(r + 1, c) === d && this.at(r + 1, c + 1) === d) {
          score += 3;
        }
      }
    }
    const dark = this.dark.reduce((sum, v) => sum + v, 0);
    score += 10 * Math.floor(Math.abs((dark * 100) / (n * n) - 50) / 5);
    return score;
  }
}

/**
 * The modules of `text`'s QR code: `{ size, dark(r, c) }`, with the mask of the lowest penalty.
 * Throws a RangeError when the text is longer than 213 bytes.
 */
export function qrCode(text) {
  const bytes = new TextEncoder().encode(text);
  const version = versionFor(bytes.length);
  if (version === 0) throw new RangeError(`${bytes.length} bytes do not fit a QR code here`);
  const grid = new Grid(version);
  grid.functionPatterns();
  grid.place(interleaved(dataCodewords(bytes, version), version));
  let best = null;
  let bestScore = Infinity;
  for (let mask = 0; mask < MASKS.length; mask += 1) {
    const candidate = grid.masked(mask);
    const score = candidate.penalty();
    if (score < bestScore) [best, bestScore] = [candidate, score];
  }
  return { size: best.size, version, dark: (r, c) => best.at(r, c) };
}

/** `text` as an SVG QR code: black on white whatever the page's colours (for cameras), with
 * the four-module quiet zone around it. */
export function qrSvg(text, label) {
  const { size, dark } = qrCode(text);
  const ns = 'http://www.w3.org/2000/svg';
  const side = size + 8;
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', `0 0 ${side} ${side}`);
  svg.setAttribute('shape-rendering', 'crispEdges');
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', label);
  const back = document.createElementNS(ns, 'rect');
  back.setAttribute('width', String(side));
  back.setAttribute('height', String(side));
  back.setAttribute('fill', '#fff');
  let d = '';
  for (let r = 0; r < size; r += 1) {
    for (let c = 0; c < size; c += 1) if (dark(r, c)) d += `M${c + 4} ${r + 4}h1v1h-1z`;
  }
  const modules = document.createElementNS(ns, 'path');
  modules.setAttribute('d', d);
  modules.setAttribute('fill', '#000');
  svg.append(back, modules);
  return svg;
}
