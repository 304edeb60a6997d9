#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(broken) = smart_git_proxy_fuzz::check_v2(data) {
        panic!("v2: {broken}");
    }
});
