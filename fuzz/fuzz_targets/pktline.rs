#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(broken) = smart_git_proxy_fuzz::check_pktline(data) {
        panic!("pktline: {broken}");
    }
});
