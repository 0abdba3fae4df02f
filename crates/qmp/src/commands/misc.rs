//! The monitor's own commands: the greeting, `query-version`, `query-commands` (`quit` and
//! `qmp_capabilities` are handled by the session, which owns what they change).

use super::COMMANDS;
use crate::json::Json;
use serde::Serialize;

/// The QEMU release whose QMP we speak; reported so that clients that check versions work.
pub const QEMU_VERSION: (u32, u32, u32) = (10, 0, 2);

#[derive(Serialize)]
struct QemuTriple {
    micro: u32,
    minor: u32,
    major: u32,
}

#[derive(Serialize)]
struct Version {
    qemu: QemuTriple,
    package: String,
}

fn version() -> Version {
    let (major, minor, micro) = QEMU_VERSION;
    Version {
        qemu: QemuTriple {
            micro,
            minor,
            major,
        },
        package: format!("imgstream {}", env!("CARGO_PKG_VERSION")),
    }
}

#[derive(Serialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Serialize)]
struct GreetingBody {
    version: Version,
    capabilities: [&'static str; 1],
}

/// The greeting line, `\r\n` included.
pub fn greeting() -> String {
    let greeting = Greeting {
        qmp: GreetingBody {
            version: version(),
            capabilities: ["oob"],
        },
    };
    format!("{}\r\n", Json::of(&greeting).as_str())
}

pub fn query_version() -> Json {
    Json::of(&version())
}

#[derive(Serialize)]
struct CommandInfo {
    name: &'static str,
}

pub fn query_commands() -> Json {
    let list: Vec<CommandInfo> = COMMANDS
        .iter()
        .map(|(name, _)| CommandInfo { name })
        .collect();
    Json::of(&list)
}
