module go-git-client

go 1.19
