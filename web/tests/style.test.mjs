// The page's colours that depend on data (run: node --test web/tests/).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

const css = readFileSync(new URL('../style.css', import.meta.url), 'utf8');

function channel(c) {
  const v = c / 255;
  return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
}

function luminance([r, g, b]) {
  return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
}

function contrast(a, b) {
  const [hi, lo] = [luminance(a), luminance(b)].sort((x, y) => y - x);
  return (hi + 0.05) / (lo + 0.05);
}

function hsl(h, s, l) {
  const k = (n) => (n + h / 30) % 12;
  const a = s * Math.min(l, 1 - l);
  const f = (n) => l - a * Math.max(-1, Math.min(k(n) - 3, 9 - k(n), 1));
  return [f(0), f(8), f(4)].map((v) => Math.round(v * 255));
}

/** A colour variable of the light (`:root`) or dark block, as [r, g, b]. */
function variable(name, dark) {
  const at = css.indexOf('prefers-color-scheme: dark');
  const block = dark ? css.slice(at) : css.slice(0, at);
  const m = block.match(new RegExp(`--${name}: #([0-9a-f]{3}|[0-9a-f]{6});`));
  const digits = m[1].length === 3 ? [...m[1]].map((d) => d + d).join('') : m[1];
  return [0, 2, 4].map((i) => parseInt(digits.slice(i, i + 2), 16));
}

test('nicknames keep a 4.5:1 contrast on every bubble whatever their hue, light and dark', () => {
  const rules = [...css.matchAll(/#messages \.nick \{[^}]*hsl\(var\(--hue, \d+\) (\d+)% (\d+)%\)/g)];
  assert.equal(rules.length, 2, 'a light and a dark nickname colour');
  for (const [[, s, l], dark] of [[rules[0], false], [rules[1], true]]) {
    for (let h = 0; h < 360; h += 1) {
      const colour = hsl(h, Number(s) / 100, Number(l) / 100);
      for (const bubble of ['own', 'other']) {
        const ratio = contrast(colour, variable(bubble, dark));
        assert.ok(ratio >= 4.5, `hue ${h} on ${bubble} (${dark ? 'dark' : 'light'}): ${ratio.toFixed(2)}`);
      }
    }
  }
});
