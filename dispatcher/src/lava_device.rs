//! LAVA's rendered device dictionary (what lava-worker hands `lava-run` as
//! `--device`), turned into Ferry's device file. LAVA's `commands` give the
//! power commands (`power_on`, `power_off`, `hard_reset`) and the console
//! (`connect`, rendered from `connection_command`); `parameters.ferry` holds
//! what LAVA's dictionaries lack (partitions, the agent's network, Ferry's
//! timeouts) and may name the console directly (`parameters`, because
//! lava-server's scheduler refuses a device whose dictionary has a top-level
//! key it does not know, and leaves `parameters` free). Everything else in the
//! dictionary (LAVA's own timeouts, constants, actions) is LAVA-dispatcher
//! configuration Ferry has no use for, and is ignored.

use serde_norway::{Mapping, Value};

/// What is wrong with a device dictionary.
#[derive(Debug, thiserror::Error)]
pub enum DictError {
    /// Not YAML, or not a mapping.
    #[error("device dictionary is not a YAML mapping: {0}")]
    Yaml(String),
    /// A required key is missing or of the wrong type.
    #[error("device dictionary: {0}")]
    Key(String),
}

/// The keys of `parameters.ferry`, copied as they are into the device file
/// (they mean exactly what they mean there).
const FERRY_KEYS: [&str; 6] = [
    "device",
    "console",
    "network",
    "partitions",
    "test_rootfs",
    "timeouts",
];

/// The console a LAVA `connect` command stands for: `telnet HOST PORT` (how
/// labs reach ser2net) becomes Ferry's telnet console, any other command
/// one whose stdin/stdout is the console.
fn console_of(connect: &str) -> Mapping {
    let mut m = Mapping::new();
    let words: Vec<&str> = connect.split_whitespace().collect();
    match words.as_slice() {
        ["telnet", host, port] if port.parse::<u16>().is_ok() => {
            m.insert("telnet".into(), format!("{host}:{port}").into());
        }
        _ => {
            m.insert("command".into(), connect.trim().into());
        }
    }
    m
}

/// Translates a rendered device dictionary into Ferry's device file (YAML
/// text). `fallback_name` names the device when `parameters.ferry` does not.
///
/// # Errors
/// When the dictionary has no power-off command, no console, or a `parameters.ferry`
/// key Ferry does not know.
pub fn translate(text: &str, fallback_name: &str) -> Result<String, DictError> {
    let doc: Value = serde_norway::from_str(text).map_err(|e| DictError::Yaml(e.to_string()))?;
    let empty = Mapping::new();
    let top = doc
        .as_mapping()
        .ok_or_else(|| DictError::Yaml("the top level is not a mapping".into()))?;
    let commands = top
        .get("commands")
        .and_then(Value::as_mapping)
        .unwrap_or(&empty);
    let command = |key: &str| -> Result<Option<String>, DictError> {
        match commands.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            // LAVA accepts a list of commands, run in turn.
            Some(Value::Sequence(list)) => list
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        DictError::Key(format!("commands.{key}: a command or a list of commands"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| Some(v.join(" && "))),
            Some(_) => Err(DictError::Key(format!(
                "commands.{key}: a command or a list of commands"
            ))),
        }
    };
    let ferry = match top.get("parameters").and_then(|p| p.get("ferry")) {
        None | Some(Value::Null) => &empty,
        Some(Value::Mapping(m)) => m,
        Some(_) => return Err(DictError::Key("parameters.ferry: a mapping".into())),
    };
    for k in ferry.keys() {
        let name = k.as_str().unwrap_or_default();
        if !FERRY_KEYS.contains(&name) {
            return Err(DictError::Key(format!(
                "parameters.ferry.{name}: unknown (known: {})",
                FERRY_KEYS.join(", ")
            )));
        }
    }
    let mut out = Mapping::new();
    out.insert(
        "device".into(),
        ferry
            .get("device")
            .cloned()
            .unwrap_or_else(|| fallback_name.into()),
    );
    let mut power = Mapping::new();
    if let Some(on) = command("power_on")? {
        power.insert("on".into(), on.into());
    }
    let off = command("power_off")?.ok_or_else(|| {
        DictError::Key(
            "commands.power_off is missing (power_off_command in the device dictionary): \
             Ferry powers the board off at the end of every job"
                .into(),
        )
    })?;
    power.insert("off".into(), off.into());
    if let Some(reset) = command("hard_reset")? {
        power.insert("reset".into(), reset.into());
    }
    out.insert("power".into(), power.into());
    let console =
        match (ferry.get("console"), command("connect")?) {
            (Some(c), _) => c.clone(),
            (None, Some(connect)) => console_of(&connect).into(),
            (None, None) => return Err(DictError::Key(
                "no console: set connection_command (commands.connect) or parameters.ferry.console"
                    .into(),
            )),
        };
    out.insert("console".into(), console);
    for key in ["network", "partitions", "test_rootfs", "timeouts"] {
        if let Some(v) = ferry.get(key) {
            out.insert(key.into(), v.clone());
        }
    }
    if !out.contains_key("partitions") {
        // A board without `parameters.ferry.partitions` runs jobs on its current test
        // rootfs, which must still be named.
        let rootfs = out
            .get("test_rootfs")
            .cloned()
            .unwrap_or_else(|| "testrootfs".into());
        out.insert("partitions".into(), vec![rootfs].into());
    }
    serde_norway::to_string(&Value::Mapping(out)).map_err(|e| DictError::Yaml(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DICT: &str = "
commands:
    connect: telnet localhost 7001
    hard_reset: pdu-client --port 3 reboot
    power_off: ['pdu-client --port 3 off', 'sleep 1']
    power_on: pdu-client --port 3 on
timeouts:
  actions: {power-off: {seconds: 10}}
parameters:
  interfaces: {}
  ferry:
    device: board-3
    partitions: [testrootfs, firmware]
    network: {address: '192.0.2.3:7070'}
    timeouts: {announce: 90s}
";

    fn device(text: &str) -> Value {
        serde_norway::from_str(&translate(text, "lava-job-7").expect("translates")).expect("yaml")
    }

    #[test]
    fn commands_and_the_ferry_block_make_a_device_file() {
        let d = device(DICT);
        assert_eq!(d["device"], "board-3");
        assert_eq!(d["power"]["on"], "pdu-client --port 3 on");
        assert_eq!(d["power"]["off"], "pdu-client --port 3 off && sleep 1");
        assert_eq!(d["power"]["reset"], "pdu-client --port 3 reboot");
        assert_eq!(d["console"]["telnet"], "localhost:7001");
        assert_eq!(d["network"]["address"], "192.0.2.3:7070");
        assert_eq!(d["timeouts"]["announce"], "90s");
        assert_eq!(d["partitions"][1], "firmware");
        assert!(d.get("parameters").is_none() && d.get("interfaces").is_none());
    }

    #[test]
    fn other_connect_commands_and_defaults() {
        let d =
            device("commands: {connect: 'microcom -s 115200 /dev/ttyUSB0', power_off: 'off'}\n");
        assert_eq!(d["console"]["command"], "microcom -s 115200 /dev/ttyUSB0");
        assert_eq!(d["device"], "lava-job-7");
        assert_eq!(d["partitions"][0], "testrootfs");
        let d = device("commands: {connect: 'telnet x 7', power_off: 'off'}\nparameters: {ferry: {console: {tty: /dev/ttyS1}}}\n");
        assert_eq!(d["console"]["tty"], "/dev/ttyS1");
    }

    #[test]
    fn what_is_missing_is_said() {
        let e = translate("commands: {connect: 'telnet a 1'}\n", "x").expect_err("no off");
        assert!(e.to_string().contains("power_off"), "{e}");
        let e = translate("commands: {power_off: 'off'}\n", "x").expect_err("no console");
        assert!(e.to_string().contains("connection_command"), "{e}");
        let e = translate(
            "commands: {power_off: 'off', connect: 'c'}\nparameters: {ferry: {colour: red}}\n",
            "x",
        )
        .expect_err("unknown key");
        assert!(e.to_string().contains("parameters.ferry.colour"), "{e}");
    }
}
