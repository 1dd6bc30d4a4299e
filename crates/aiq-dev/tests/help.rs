//! The developer binary's commands, which moved out of the production `aiq` binary.

#[test]
fn every_subcommand_prints_help() {
    for sub in ["demo", "bench", "fake-providers"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_aiq-dev"))
            .args([sub, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{sub} --help failed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage: aiq-dev"), "{sub}: {text}");
        assert!(text.lines().count() > 3, "{sub} help is too thin: {text}");
    }
}
