// KaTeX typesets the math of every page: what pymdownx.arithmatex leaves of the Markdown pages
// and the docstrings (class "arithmatex": \( \) and \[ \]), and the notebooks' Markdown cells
// ($ and $$). Code and outputs (<pre>, <code>) are left alone.
const delimiters = [
  { left: "$$", right: "$$", display: true },
  { left: "\\[", right: "\\]", display: true },
  { left: "$", right: "$", display: false },
  { left: "\\(", right: "\\)", display: false },
];
for (const element of document.querySelectorAll(".arithmatex, .jp-MarkdownOutput")) {
  renderMathInElement(element, { delimiters });
}
