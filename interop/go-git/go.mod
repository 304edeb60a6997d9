// Not built as a module: tests/it/interop.rs builds this package in GOPATH mode against Debian's
// go-git (/usr/share/gocode). This file is what lets Go's minimal module compatibility resolve
// the `github.com/go-git/go-git/v5` import paths there.
module go-git-client

go 1.19
