//! The `imgstream` binary.

fn main() {
    eprintln!("imgstream: not built yet");
    std::process::exit(1);
}
