#include "vitedge/json.hpp"

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace vitedge {

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : s_(text) {}

  Json document() {
    Json value = parse_value(0);
    skip_space();
    if (pos_ != s_.size()) fail("trailing characters after the JSON value");
    return value;
  }

 private:
  const std::string& s_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("JSON: " + what + " at offset " + std::to_string(pos_));
  }

  void skip_space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) ++pos_;
  }

  char peek() {
    skip_space();
    if (pos_ >= s_.size()) fail("unexpected end of input");
    return s_[pos_];
  }

  void expect(const char* word) {
    for (const char* c = word; *c; ++c, ++pos_) {
      if (pos_ >= s_.size() || s_[pos_] != *c) fail(std::string("expected '") + word + "'");
    }
  }

  Json parse_value(int depth) {
    if (depth > 256) fail("nesting deeper than 256");
    Json value;
    char c = peek();
    if (c == '{') {
      value.type_ = Json::Type::Object;
      ++pos_;
      if (peek() == '}') { ++pos_; return value; }
      while (true) {
        if (peek() != '"') fail("expected a string key");
        std::string key = parse_string();
        if (peek() != ':') fail("expected ':'");
        ++pos_;
        value.object_[key] = parse_value(depth + 1);
        char next = peek();
        ++pos_;
        if (next == '}') break;
        if (next != ',') fail("expected ',' or '}'");
      }
    } else if (c == '[') {
      value.type_ = Json::Type::Array;
      ++pos_;
      if (peek() == ']') { ++pos_; return value; }
      while (true) {
        value.array_.push_back(parse_value(depth + 1));
        char next = peek();
        ++pos_;
        if (next == ']') break;
        if (next != ',') fail("expected ',' or ']'");
      }
    } else if (c == '"') {
      value.type_ = Json::Type::String;
      value.string_ = parse_string();
    } else if (c == 't') {
      expect("true");
      value.type_ = Json::Type::Bool;
      value.bool_ = true;
    } else if (c == 'f') {
      expect("false");
      value.type_ = Json::Type::Bool;
    } else if (c == 'n') {
      expect("null");
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      value.type_ = Json::Type::Number;
      value.number_ = parse_number();
    } else {
      fail(std::string("unexpected character '") + c + "'");
    }
    return value;
  }

  double parse_number() {
    size_t start = pos_;
    if (s_[pos_] == '-') ++pos_;
    auto digits = [&] {
      size_t begin = pos_;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      if (pos_ == begin) fail("malformed number");
    };
    digits();
    if (pos_ < s_.size() && s_[pos_] == '.') { ++pos_; digits(); }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      digits();
    }
    return std::strtod(s_.substr(start, pos_ - start).c_str(), nullptr);
  }

  static void append_utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  unsigned hex4() {
    if (pos_ + 4 > s_.size()) fail("short \\u escape");
    unsigned code = 0;
    for (int i = 0; i < 4; ++i) {
      char h = s_[pos_++];
      code <<= 4;
      if (h >= '0' && h <= '9') code |= h - '0';
      else if (h >= 'a' && h <= 'f') code |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') code |= h - 'A' + 10;
      else fail("bad hex digit in \\u escape");
    }
    return code;
  }

  std::string parse_string() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) fail("unterminated string");
      char c = s_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') { out += c; continue; }
      if (pos_ >= s_.size()) fail("unterminated escape");
      char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned code = hex4();
          if (code >= 0xD800 && code < 0xDC00) {  // a surrogate pair
            if (pos_ + 2 > s_.size() || s_[pos_] != '\\' || s_[pos_ + 1] != 'u') fail("lone high surrogate");
            pos_ += 2;
            unsigned low = hex4();
            if (low < 0xDC00 || low >= 0xE000) fail("bad low surrogate");
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, code);
          break;
        }
        default: fail(std::string("bad escape '\\") + e + "'");
      }
    }
  }
};

Json Json::parse(const std::string& text) { return JsonParser(text).document(); }

Json Json::parse_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  try {
    return parse(buffer.str());
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
}

static const char* type_name(Json::Type t) {
  switch (t) {
    case Json::Type::Null: return "null";
    case Json::Type::Bool: return "a boolean";
    case Json::Type::Number: return "a number";
    case Json::Type::String: return "a string";
    case Json::Type::Array: return "an array";
    default: return "an object";
  }
}

static void require(Json::Type have, Json::Type want) {
  if (have != want) throw std::runtime_error(std::string("JSON: expected ") + type_name(want) + ", found " + type_name(have));
}

double Json::number() const { require(type_, Type::Number); return number_; }

long long Json::integer() const {
  require(type_, Type::Number);
  if (std::floor(number_) != number_) throw std::runtime_error("JSON: expected an integer, found " + std::to_string(number_));
  return static_cast<long long>(number_);
}

bool Json::boolean() const { require(type_, Type::Bool); return bool_; }
const std::string& Json::string() const { require(type_, Type::String); return string_; }
const std::vector<Json>& Json::array() const { require(type_, Type::Array); return array_; }
const std::map<std::string, Json>& Json::object() const { require(type_, Type::Object); return object_; }

bool Json::has(const std::string& key) const { return type_ == Type::Object && object_.count(key) > 0; }

const Json& Json::operator[](const std::string& key) const {
  auto it = object().find(key);
  if (it == object_.end()) throw std::runtime_error("JSON: missing key '" + key + "'");
  return it->second;
}

const Json& Json::operator[](size_t index) const {
  if (index >= array().size()) throw std::runtime_error("JSON: index " + std::to_string(index) + " out of range");
  return array_[index];
}

size_t Json::size() const {
  if (type_ == Type::Array) return array_.size();
  if (type_ == Type::Object) return object_.size();
  throw std::runtime_error(std::string("JSON: size of ") + type_name(type_));
}

}  // namespace vitedge
