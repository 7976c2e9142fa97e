// Unit tests of the parts that need no JupyterLab: reply parsing, the code-block toolbar, the
// %%chat highlighting spans. JupyterLab's and CodeMirror's packages ship ES modules, so babel
// transforms them too.
const jestJupyterLab = require('@jupyterlab/testing/lib/jest-config');

const esModules = ['@codemirror', '@jupyter/ydoc', '@jupyterlab/', '@lezer', 'lib0', 'nanoid', 'y-protocols', 'yjs'].join('|');

module.exports = {
  ...jestJupyterLab(__dirname),
  automock: false,
  testRegex: 'src/__tests__/.*\\.spec\\.ts$',
  transformIgnorePatterns: [`/node_modules/(?!${esModules}).+`]
};
