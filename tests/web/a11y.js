// Accessibility basics for tests/web/test_layout.py, evaluated in each page (no offline axe).
(() => {
  const problems = [];
  const named = (el) => {
    if ((el.getAttribute("aria-label") || "").trim() || el.getAttribute("aria-labelledby")) return true;
    if (el.id && document.querySelector(`label[for="${CSS.escape(el.id)}"]`)) return true;
    if (el.closest("label")) return true;
    if (["BUTTON", "A", "SUMMARY"].includes(el.tagName)) return el.textContent.trim().length > 0;
    if (el.tagName === "INPUT" && ["submit", "button", "reset"].includes(el.type)) return !!el.value;
    return !!el.getAttribute("title");
  };
  for (const el of document.querySelectorAll("input:not([type=hidden]), select, textarea, button, a[href], summary")) {
    if (el.closest("[hidden]")) continue;
    if (!named(el)) problems.push("unnamed " + el.tagName.toLowerCase() + (el.id ? "#" + el.id : ""));
  }
  for (const el of document.querySelectorAll("img, svg[role=img], canvas:not([aria-hidden=true])")) {
    const text = el.getAttribute("alt") ?? el.getAttribute("aria-label") ?? el.querySelector?.("title")?.textContent;
    if (!text || !text.trim()) problems.push("no text alternative: " + el.tagName.toLowerCase() + (el.id ? "#" + el.id : ""));
  }
  if (!document.documentElement.lang) problems.push("no lang");
  if (!document.querySelector("main")) problems.push("no main landmark");
  const rgb = (c) => (c.match(/[\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => [r, g, b].map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
    .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
  const background = (el) => {
    for (let node = el; node; node = node.parentElement) {
      const c = rgb(getComputedStyle(node).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] === 1)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const seen = new Set();
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!node.textContent.trim() || seen.has(el) || el.closest("svg, [hidden], script, style")) continue;
    seen.add(el);
    const style = getComputedStyle(el);
    if (style.visibility === "hidden" || style.display === "none" || !el.getClientRects().length) continue;
    const fg = rgb(style.color), bg = background(el);
    const alpha = fg.length === 4 ? fg[3] : 1;
    const mixed = fg.slice(0, 3).map((v, i) => v * alpha + bg[i] * (1 - alpha));
    const [hi, lo] = [lum(mixed), lum(bg)].sort((a, b) => b - a);
    const ratio = (hi + 0.05) / (lo + 0.05);
    if (ratio < 4.5) problems.push(`contrast ${ratio.toFixed(2)} on "${node.textContent.trim().slice(0, 30)}"`);
  }
  return problems;
})
