// Drive JGit against a URL, for the interoperability tests.
//
// Usage:
//   java -cp CLASSES:/usr/share/java/org.eclipse.jgit.jar JgitClient clone URL DEST [--branch B]
//   java -cp ... JgitClient fetch DEST
//   java -cp ... JgitClient ls-remote URL
//
// Clones are bare; `--branch` makes a single-branch clone. Fetches take every tag, as a clone
// does. `ls-remote` prints `<oid> <ref>` lines sorted by ref. Exits non-zero with JGit's error
// on failure. Debian's libjgit-java (4.11) has no shallow or partial fetch, so there is no
// `--depth` or `--filter`; the jar's manifest names its dependencies (JavaEWAH, jsch, slf4j).

import java.io.File;
import java.util.Collections;
import java.util.Map;
import java.util.TreeMap;

import org.eclipse.jgit.api.CloneCommand;
import org.eclipse.jgit.api.Git;
import org.eclipse.jgit.lib.Ref;
import org.eclipse.jgit.transport.TagOpt;

public final class JgitClient {
    private JgitClient() {}

    public static void main(String[] args) {
        try {
            run(args);
        } catch (Exception e) {
            e.printStackTrace();
            System.exit(1);
        }
    }

    private static void run(String[] args) throws Exception {
        if (args.length < 2) {
            throw new IllegalArgumentException("usage: JgitClient clone|fetch|ls-remote TARGET [DEST] [--branch B]");
        }
        String op = args[0];
        String target = args[1];
        switch (op) {
            case "clone": {
                if (args.length < 3) {
                    throw new IllegalArgumentException("clone needs DEST");
                }
                CloneCommand clone = Git.cloneRepository()
                        .setURI(target)
                        .setDirectory(new File(args[2]))
                        .setBare(true)
                        .setNoCheckout(true);
                String branch = option(args, 3, "--branch");
                if (branch != null) {
                    String ref = "refs/heads/" + branch;
                    clone.setBranch(ref)
                            .setCloneAllBranches(false)
                            .setBranchesToClone(Collections.singletonList(ref));
                } else {
                    clone.setCloneAllBranches(true);
                }
                clone.call().close();
                break;
            }
            case "fetch": {
                try (Git git = Git.open(new File(target))) {
                    git.fetch().setRemote("origin").setTagOpt(TagOpt.FETCH_TAGS).call();
                }
                break;
            }
            case "ls-remote": {
                Map<String, Ref> refs = new TreeMap<>(
                        Git.lsRemoteRepository().setRemote(target).callAsMap());
                for (Ref ref : refs.values()) {
                    if (!ref.isSymbolic() && ref.getObjectId() != null) {
                        System.out.println(ref.getObjectId().name() + " " + ref.getName());
                    }
                }
                break;
            }
            default:
                throw new IllegalArgumentException("unknown operation " + op);
        }
    }

    /**
     * The value after `name` among `args[from..]`, or null. Any other option is an error, so a
     * shape this JGit cannot do (`--depth`) fails loudly instead of cloning in full.
     */
    private static String option(String[] args, int from, String name) {
        String value = null;
        for (int i = from; i < args.length; i += 2) {
            if (!args[i].equals(name) || i + 1 == args.length) {
                throw new IllegalArgumentException("unsupported option " + args[i]);
            }
            value = args[i + 1];
        }
        return value;
    }
}
