// Command go-git-client drives go-git against a URL, for the interoperability tests.
//
// Usage:
//
//	go-git-client clone URL DEST [--depth N] [--branch B]
//	go-git-client fetch DEST [--depth N]
//	go-git-client ls-remote URL
//
// Clones are bare; `--branch` makes a single-branch clone. Fetches take every tag, as a clone
// does. `ls-remote` prints `<oid> <ref>` lines sorted by ref. Exits non-zero with go-git's
// error on failure.
//
// It builds offline against Debian's golang-github-go-git-go-git-dev in GOPATH mode
// (GOPATH=/usr/share/gocode GO111MODULE=off); tests/it/interop.rs does that once per run.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"

	git "github.com/go-git/go-git/v5"
	"github.com/go-git/go-git/v5/config"
	"github.com/go-git/go-git/v5/plumbing"
	"github.com/go-git/go-git/v5/storage/memory"
)

func main() {
	if len(os.Args) < 3 {
		fail(errors.New("usage: go-git-client clone|fetch|ls-remote TARGET [DEST] [--depth N] [--branch B]"))
	}
	op, target, rest := os.Args[1], os.Args[2], os.Args[3:]
	var dest string
	if op == "clone" {
		if len(rest) == 0 {
			fail(errors.New("clone needs DEST"))
		}
		dest, rest = rest[0], rest[1:]
	}
	flags := flag.NewFlagSet(op, flag.ExitOnError)
	depth := flags.Int("depth", 0, "history depth (0: full)")
	branch := flags.String("branch", "", "the only branch to clone")
	if err := flags.Parse(rest); err != nil {
		fail(err)
	}

	var err error
	switch op {
	case "clone":
		err = clone(target, dest, *depth, *branch)
	case "fetch":
		err = fetch(target, *depth)
	case "ls-remote":
		err = lsRemote(target)
	default:
		err = fmt.Errorf("unknown operation %q", op)
	}
	if err != nil {
		fail(err)
	}
}

func clone(url, dest string, depth int, branch string) error {
	opts := &git.CloneOptions{URL: url, Depth: depth, NoCheckout: true, Tags: git.AllTags}
	if branch != "" {
		opts.ReferenceName = plumbing.NewBranchReferenceName(branch)
		opts.SingleBranch = true
	}
	_, err := git.PlainClone(dest, true, opts)
	return err
}

func fetch(dir string, depth int) error {
	repo, err := git.PlainOpen(dir)
	if err != nil {
		return err
	}
	err = repo.Fetch(&git.FetchOptions{Depth: depth, Tags: git.AllTags})
	// Nothing new is success: the tests check the resulting refs themselves.
	if errors.Is(err, git.NoErrAlreadyUpToDate) {
		return nil
	}
	return err
}

func lsRemote(url string) error {
	remote := git.NewRemote(memory.NewStorage(), &config.RemoteConfig{Name: "origin", URLs: []string{url}})
	refs, err := remote.List(&git.ListOptions{})
	if err != nil {
		return err
	}
	sort.Slice(refs, func(i, j int) bool { return refs[i].Name() < refs[j].Name() })
	for _, r := range refs {
		if r.Type() == plumbing.HashReference && r.Name() != plumbing.HEAD {
			fmt.Printf("%s %s\n", r.Hash(), r.Name())
		}
	}
	return nil
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}
