// The pure helpers: the close-code table and the backoff.

import assert from "node:assert/strict";
import { test } from "node:test";

import { backoffDelay, shouldReconnect } from "../roomcast.js";

test("the reconnect codes are 1001, 1006, 1011, 1012, 1013 and 4000-4499", () => {
  for (const code of [1001, 1006, 1011, 1012, 1013, 4000, 4001, 4002, 4250, 4499]) {
    assert.equal(shouldReconnect(code), true, `code ${code}`);
  }
  assert.equal(shouldReconnect(null), true, "a socket that just died");
});

test("every other code is terminal: 1000, 1008, 1009, 1002, 1007, 4500-4999", () => {
  for (const code of [1000, 1002, 1003, 1005, 1007, 1008, 1009, 1010, 1015, 3000, 3999,
    4500, 4501, 4502, 4503, 4999]) {
    assert.equal(shouldReconnect(code), false, `code ${code}`);
  }
});

test("full jitter: uniform over [0, min(cap, base * 2^attempt)]", () => {
  assert.equal(backoffDelay(0, 500, 20000, () => 1), 500);
  assert.equal(backoffDelay(1, 500, 20000, () => 1), 1000);
  assert.equal(backoffDelay(3, 500, 20000, () => 0.5), 2000);
  assert.equal(backoffDelay(5, 500, 20000, () => 1), 16000);
  assert.equal(backoffDelay(6, 500, 20000, () => 1), 20000, "capped");
  assert.equal(backoffDelay(1000, 500, 20000, () => 1), 20000, "no overflow");
  assert.equal(backoffDelay(4, 500, 20000, () => 0), 0);
  assert.equal(backoffDelay(-3, 500, 20000, () => 1), 500, "a negative attempt is the first");
});

test("the defaults are 500 ms to 20 s, drawn with Math.random", () => {
  for (let i = 0; i < 200; i++) {
    const first = backoffDelay(0);
    assert.ok(first >= 0 && first <= 500, `${first}`);
    const late = backoffDelay(30);
    assert.ok(late >= 0 && late <= 20000, `${late}`);
  }
});
