// Drive isomorphic-git against a URL, for the interoperability tests.
//
// Usage:
//   node iso_client.mjs clone URL DEST [--depth N] [--branch B] [--single-branch]
//   node iso_client.mjs fetch DEST [--depth N]
//   node iso_client.mjs ls-remote URL
//
// Clones are not checked out (`noCheckout`), so the result is a repository to fsck.
import fs from "node:fs";
import git from "isomorphic-git";
import http from "isomorphic-git/http/node";

const [op, target, dest, ...rest] = process.argv.slice(2);
const opt = (name) => {
  const i = rest.indexOf(name);
  return i >= 0 ? rest[i + 1] : undefined;
};
const depth = opt("--depth") ? Number(opt("--depth")) : undefined;

try {
  if (op === "clone") {
    await git.clone({
      fs,
      http,
      dir: dest,
      url: target,
      depth,
      ref: opt("--branch"),
      singleBranch: rest.includes("--single-branch"),
      noCheckout: true,
    });
  } else if (op === "fetch") {
    await git.fetch({ fs, http, dir: target, depth, tags: true });
  } else if (op === "ls-remote") {
    const refs = await git.listServerRefs({ http, url: target });
    for (const r of refs.sort((a, b) => (a.ref < b.ref ? -1 : 1))) {
      if (r.ref !== "HEAD" && !r.ref.endsWith("^{}")) console.log(`${r.oid} ${r.ref}`);
    }
  } else {
    throw new Error(`unknown operation ${op}`);
  }
} catch (e) {
  console.error(e.stack || String(e));
  process.exit(1);
}
