// The QR encoder's parts against values published with the standard (run: node --test web/tests/).
// Whole codes are read back by a real decoder in the browser tests (tests/it/browser.rs).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  correction, dataCodewords, formatInfo, versionInfo, versionFor, qrCode, MAX_VERSION,
} from '../qr.js';

test('error correction codewords of the standard\'s 1-M example', () => {
  // "HELLO WORLD" in alphanumeric mode at version 1-M, padded: its ten EC codewords.
  const data = [32, 91, 11, 120, 209, 114, 220, 77, 67, 64, 236, 17, 236, 17, 236, 17];
  assert.deepEqual(correction(data, 10), [196, 35, 39, 119, 235, 215, 231, 226, 93, 23]);
});

test('format and version information', () => {
  assert.equal(formatInfo(0), 0b101010000010010); // level M, mask 0
  assert.equal(versionInfo(7), 0x07c94);
  assert.equal(versionInfo(8), 0x085bc);
  assert.equal(versionInfo(9), 0x09a99);
  assert.equal(versionInfo(10), 0x0a4d3);
});

test('byte mode data: header, bytes, terminator, alternating pad bytes', () => {
  const data = dataCodewords([0x41, 0x42], 1);
  // 0100 | 00000010 | 01000001 | 01000010 | 0000, then 0xEC 0x11 ... to 16 codewords.
  assert.deepEqual(data.slice(0, 4), [0x40, 0x24, 0x14, 0x20]);
  assert.deepEqual(data.slice(4, 8), [0xec, 0x11, 0xec, 0x11]);
  assert.equal(data.length, 16);
});

test('versions grow with the text and stop at 213 bytes', () => {
  assert.equal(versionFor(14), 1);
  assert.equal(versionFor(15), 2);
  assert.equal(versionFor(106), 6);
  assert.equal(versionFor(107), 7);
  assert.equal(versionFor(213), MAX_VERSION);
  assert.equal(versionFor(214), 0);
  assert.throws(() => qrCode('x'.repeat(214)), RangeError);
  const link = `https://${'a'.repeat(56)}.onion/#${'A'.repeat(43)}`;
  const code = qrCode(link);
  assert.equal(code.size, 17 + 4 * code.version);
  assert.ok(code.version >= 7, 'an onion link needs version information');
});
